"""Sharded streaming safetensors output with an atomic finish and resumable shards.

Output goes to a hidden sibling directory ``.NAME.partial``; each shard is written to a
temporary file, fsynced and renamed, and recorded in a state file, so ``--resume`` skips
finished shards.  config.json is written last and the directory is renamed into place only
after verification, so an interrupted run never leaves a directory that loads as complete.
"""

from __future__ import annotations

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


def _io_error(e: OSError, path, what: str) -> ConvertError:
    if e.errno == errno.ENOSPC:
        return ConvertError(f"{path}: output disk is full while writing {what}; previous output is untouched")
    return ConvertError(f"{path}: cannot write {what}: {e.strerror or e}; previous output is untouched")


class OutputDir:
    def __init__(self, out: Path, fp: str, resume: bool, overwrite: bool, need_bytes: int):
        self.out = Path(out)
        self.tmp = partial_dir(self.out)
        self.fp = fp
        if self.out.exists() and not overwrite:
            raise ConvertError(f"{self.out}: already exists; pass --overwrite to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise ConvertError(f"{self.out}: exists and is not a directory")
        self.done: dict[str, int] = {}
        parent = self.out.parent
        if not parent.is_dir():
            raise ConvertError(f"{parent}: output parent directory does not exist or is not a directory")
        if self.tmp.exists():
            state = self._read_state()
            if not resume:
                raise ConvertError(f"{self.tmp}: left by an interrupted conversion; pass --resume to continue "
                                   "it, or remove it to start over")
            if state.get("fingerprint") != fp:
                raise ConvertError(f"{self.tmp}: was started with a different source or recipe; remove it "
                                   "to start over")
            self.done = {k: v for k, v in state.get("done", {}).items()
                         if (self.tmp / k).is_file() and (self.tmp / k).stat().st_size == v}
        else:
            try:
                self.tmp.mkdir()
                probe = self.tmp / ".probe"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise _io_error(e, parent, "the output") from None
        free = shutil.disk_usage(self.tmp).free
        left = need_bytes - sum(self.done.values())
        if left > free:
            raise ConvertError(f"{parent}: not enough free space: the output needs {left / 1e9:.2f} GB more, "
                               f"{free / 1e9:.2f} GB free; previous output is untouched")
        self._write_state()

    def _read_state(self) -> dict:
        try:
            return json.loads((self.tmp / STATE).read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self):
        tmp = self.tmp / (STATE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fp, "done": self.done}, indent=1))
        os.replace(tmp, self.tmp / STATE)

    def is_done(self, shard: Shard) -> bool:
        return shard.filename in self.done

    def write_shard(self, shard: Shard, produce, on_unit=None):
        """produce(unit) -> arrays matching unit.outputs; streamed to disk one unit at a time."""
        final = self.tmp / shard.filename
        part = self.tmp / (shard.filename + ".tmp")
        current = shard.filename
        try:
            with open(part, "wb") as f:
                f.write(safetensors_header(shard))
                for u in shard.units:
                    current = u.name
                    for a in produce(u):
                        f.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
                    if on_unit:
                        on_unit(u)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, final)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise _io_error(e, part, f"tensor {current!r}") from None
        self.done[shard.filename] = final.stat().st_size
        self._write_state()

    def write_json(self, name: str, obj):
        try:
            (self.tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        except OSError as e:
            raise _io_error(e, self.tmp / name, name) from None

    def copy_file(self, src: Path, rel: str):
        dst = self.tmp / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        except OSError as e:
            raise _io_error(e, dst, rel) from None

    def finish(self):
        (self.tmp / STATE).unlink(missing_ok=True)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
