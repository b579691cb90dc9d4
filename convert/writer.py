"""Sharded streaming safetensors output with an atomic, resumable finish and resumable shards.

Output goes to a hidden sibling directory ``.NAME.partial``; each shard is written to a
temporary file, fsynced and renamed, and recorded with its size and SHA-256 (hashed while
writing) in a state file, so ``--resume`` skips finished shards whose bytes are unchanged.
Every other file is also written under a temporary name and renamed, so a failed write keeps
the previous version.  config.json is written last and the directory is renamed into place
only after verification, so an interrupted run never leaves a directory that loads as
complete.  The finishing renames are recorded in the state file, which moves with the
directory and is removed last, so ``--resume`` completes a finish that was cut short.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError

STATE = ".convert-state.json"
INDEX = {"model": "model.safetensors.index.json", "mtp": "mtp.safetensors.index.json"}
CHECKSUM = "sha256"  # key of the {shard: hex digest} map in each index's metadata


@dataclass
class Shard:
    group: str
    filename: str
    units: list

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def layout_shards(units, max_bytes: int) -> list[Shard]:
    shards = []
    for group in ("model", "mtp"):
        cur, size, groups = [], 0, []
        for u in units:
            if u.group != group:
                continue
            if cur and size + u.nbytes > max_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append(u)
            size += u.nbytes
        if cur:
            groups.append(cur)
        n = len(groups)
        shards += [Shard(group, f"{group}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]
    return shards


def safetensors_header(shard: Shard) -> bytes:
    header, offset = {}, 0
    for u in shard.units:
        for name, dtype, shape in u.outputs:
            from .plan import ITEMSIZE

            n = math.prod(shape) * ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def fingerprint(shards, extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for s in shards:
        h.update(s.filename.encode())
        h.update(safetensors_header(s))
    return h.hexdigest()


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    buf = memoryview(bytearray(16 << 20))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def refuse_overlap(src: Path, inputs, out: Path):
    """Replacing an output that is, holds or lies inside the input would delete the input."""
    places = {out.resolve(), partial_dir(out).resolve()}
    for path in (src, *inputs):
        real = Path(path).resolve()
        for place in places:
            if real == place:
                how = f"both are {real}"
            elif place in real.parents:
                how = f"{real} lies inside {place}"
            elif real in place.parents:
                how = f"{place} lies inside {real}"
            else:
                continue
            raise ConvertError(f"output {out} and input {src} overlap ({how}, symbolic links resolved); "
                               "choose an output directory outside the input; nothing was written")


def _io_error(e: OSError, path, what: str) -> ConvertError:
    if e.errno == errno.ENOSPC:
        return ConvertError(f"{path}: output disk is full while writing {what}; previous output is untouched")
    return ConvertError(f"{path}: cannot write {what}: {e.strerror or e}; previous output is untouched")


def _replace_file(path: Path, fill, what: str):
    """fill(temporary path) writes the new contents, which replace `path` only once complete."""
    part = path.with_name(path.name + ".tmp")
    try:
        fill(part)
        os.replace(part, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        raise _io_error(e, path, what) from None


def _backup_path(out: Path) -> Path:
    """A name next to `out` that nothing uses yet, for the previous output while it is replaced."""
    path, n = out.parent / f".{out.name}.old", 1
    while os.path.lexists(path):
        n += 1
        path = out.parent / f".{out.name}.old{n}"
    return path


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _read_state(path: Path) -> dict | None:
    """The conversion state at `path`, None where there is none."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: unreadable conversion state ({e}); remove {path.parent} to start over") from None
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: unreadable conversion state (not an object); remove {path.parent} to start over")
    return state


class OutputDir:
    def __init__(self, out: Path, fp: str, resume: bool, overwrite: bool, need_bytes: int, log=lambda s: None):
        self.out = Path(out)
        self.tmp = partial_dir(self.out)
        self.fp = fp
        self.log = log
        self.done: dict[str, dict] = {}
        self.backup: Path | None = None  # the previous output, once moved aside by finish()
        # True when an earlier run moved its finished output into place but was stopped before cleaning up
        self.finished = resume and not self.tmp.exists() and self._finished_earlier()
        if self.finished:
            return
        if os.path.lexists(self.out) and not overwrite:
            stopped = (self.out / STATE).is_file()
            raise ConvertError(f"{self.out}: already exists; pass --overwrite to replace it"
                               + (", or --resume to finish the conversion that was stopped while moving it "
                                  "into place" if stopped else ""))
        if self.out.exists() and not self.out.is_dir():
            raise ConvertError(f"{self.out}: exists and is not a directory")
        parent = self.out.parent
        if not parent.is_dir():
            raise ConvertError(f"{parent}: output parent directory does not exist or is not a directory")
        if self.tmp.exists():
            state = _read_state(self.tmp / STATE)
            if state is None:
                raise ConvertError(f"{self.tmp}: exists but holds no conversion state ({STATE}); remove it "
                                   "to start over")
            moved = (state.get("finishing") or {}).get("backup")
            if moved and not os.path.lexists(self.out) and os.path.lexists(parent / moved):
                self.backup = parent / moved
            if not resume:
                raise ConvertError(f"{self.tmp}: left by an interrupted conversion; pass --resume to continue "
                                   "it, or remove it to start over"
                                   + (f" (the previous output was moved to {self.backup})" if self.backup else ""))
            if state.get("fingerprint") != fp:
                raise ConvertError(f"{self.tmp}: was started with a different source or recipe; remove it "
                                   "to start over")
            self.done = self._unchanged_shards(state.get("done") or {})
        else:
            try:
                self.tmp.mkdir()
                probe = self.tmp / ".probe"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise _io_error(e, parent, "the output") from None
        free = shutil.disk_usage(self.tmp).free
        left = need_bytes - sum(r["size"] for r in self.done.values())
        if left > free:
            raise ConvertError(f"{parent}: not enough free space: the output needs {left / 1e9:.2f} GB more, "
                               f"{free / 1e9:.2f} GB free; previous output is untouched")
        self._write_state()

    def _finished_earlier(self) -> bool:
        try:
            state = _read_state(self.out / STATE)
        except ConvertError:
            return False
        if not state or state.get("fingerprint") != self.fp or not isinstance(state.get("finishing"), dict):
            return False
        moved = state["finishing"].get("backup")
        if moved and os.path.lexists(self.out.parent / moved):
            self.backup = self.out.parent / moved
        return True

    def _unchanged_shards(self, recorded: dict) -> dict:
        """The recorded shards whose bytes still match their checksum; the others are written again."""
        done = {}
        for name, rec in recorded.items():
            path = self.tmp / name
            why = None
            if not isinstance(rec, dict) or not isinstance(rec.get(CHECKSUM), str):
                why = "has no recorded checksum"
            elif not path.is_file() or path.stat().st_size != rec.get("size"):
                why = "is missing or its size changed since it was written"
            else:
                try:
                    if file_checksum(path) != rec[CHECKSUM]:
                        why = "does not match the checksum recorded when it was written"
                except OSError as e:
                    why = f"cannot be read ({e.strerror or e})"
            if why:
                self.log(f"{path}: {why}; rewriting it")
            else:
                done[name] = rec
        return done

    def _write_state(self, finishing: dict | None = None):
        state = {"fingerprint": self.fp, "done": self.done}
        if finishing is not None:
            state["finishing"] = finishing
        text = json.dumps(state, indent=1)
        _replace_file(self.tmp / STATE, lambda p: p.write_text(text), "the conversion state (for --resume)")

    def is_done(self, shard: Shard) -> bool:
        return shard.filename in self.done

    def checksum(self, shard: Shard) -> str:
        return self.done[shard.filename][CHECKSUM]

    def write_shard(self, shard: Shard, produce, on_unit=None):
        """produce(unit) -> arrays matching unit.outputs; streamed to disk one unit at a time."""
        final = self.tmp / shard.filename
        part = self.tmp / (shard.filename + ".tmp")
        current = shard.filename
        digest = hashlib.sha256()
        try:
            with open(part, "wb") as f:
                header = safetensors_header(shard)
                f.write(header)
                digest.update(header)
                for u in shard.units:
                    current = u.name
                    for a in produce(u):
                        if a.size:
                            data = memoryview(a.reshape(-1)).cast("B")
                            f.write(data)
                            digest.update(data)
                    if on_unit:
                        on_unit(u)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, final)
            size = final.stat().st_size
        except OSError as e:
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
            raise _io_error(e, part, f"tensor {current!r}") from None
        self.done[shard.filename] = {"size": size, CHECKSUM: digest.hexdigest()}
        self._write_state()

    def write_json(self, name: str, obj):
        text = json.dumps(obj, indent=2) + "\n"
        _replace_file(self.tmp / name, lambda p: p.write_text(text), name)

    def write_text(self, name: str, text: str):
        _replace_file(self.tmp / name, lambda p: p.write_text(text, encoding="utf-8"), name)

    def copy_file(self, src: Path, rel: str):
        dst = self.tmp / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _io_error(e, dst.parent, rel) from None
        _replace_file(dst, lambda p: shutil.copyfile(src, p), rel)

    def finish(self):
        """Moves the verified output into place, then removes the previous one.

        The state file records the name the previous output is moved to; it travels with the
        directory and is removed last, so after a stop at any point ``--resume`` either finds
        the partial directory (and renames it again) or the finished output (and cleans up)."""
        if not self.finished:
            replacing = os.path.lexists(self.out)
            if replacing:
                self.backup = _backup_path(self.out)
            self._write_state({"backup": self.backup.name if self.backup else None})
            if replacing:
                try:
                    os.replace(self.out, self.backup)
                except OSError as e:
                    raise ConvertError(f"{self.out}: cannot move the previous output aside to {self.backup}: "
                                       f"{e.strerror or e}; previous output is untouched, the new one is "
                                       f"complete in {self.tmp} (--resume finishes it)") from None
            try:
                os.replace(self.tmp, self.out)
            except OSError as e:
                where = "previous output is untouched"
                if replacing:
                    try:
                        os.replace(self.backup, self.out)
                    except OSError:
                        where = f"the previous output is in {self.backup}"
                raise ConvertError(f"{self.out}: cannot move the new output into place: {e.strerror or e}; "
                                   f"{where}, the new one is complete in {self.tmp} (--resume finishes it)") from None
            self.finished = True
        if self.backup is not None and os.path.lexists(self.backup):
            try:
                _remove(self.backup)
            except OSError as e:
                self.log(f"warning: could not remove the previous output (moved to {self.backup}): {e.strerror or e}")
        try:
            (self.out / STATE).unlink(missing_ok=True)
        except OSError as e:
            self.log(f"warning: could not remove {self.out / STATE}: {e.strerror or e}")
