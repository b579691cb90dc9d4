"""Prompt-cache snapshots of many conversations at once, under a byte budget, kept on disk too.

A snapshot is the model cache after a token prefix. ``PrefixStore`` keeps them per partition
(one per API key in the server; one for chat or an agent) in memory, least recently used
first out once ``memory_bytes`` is exceeded. With a ``directory``, every snapshot is also
written there as its own prompt-cache file (the format of ``save_prompt_cache``, so the
same checks apply when it is read back), named by the model fingerprint and a hash of the
partition and tokens; a restarted process finds them again from their headers alone and
loads the arrays when a prompt first extends one. A file that is truncated, damaged, written
for another model or not a prompt cache is skipped with a warning, and the snapshot is made
anew; nothing else is lost. ``disk_bytes`` bounds the directory the same way.

``store.view(partition)`` has the interface ``stream_generate`` uses of a ``PromptCache``.
"""

import base64
import hashlib
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .generate import (
    PROMPT_CACHE_FORMAT,
    PromptCache,
    PromptCacheError,
    _Snapshot,
    load_prompt_cache,
    model_fingerprint,
    restore_snapshot,
    save_prompt_cache,
    snapshot_bytes,
)

log = logging.getLogger("mlx_dsv4.prefix_store")

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 64 << 20  # a header holds the token ids as base64: 64 MiB is ~12M tokens


def default_directory() -> Path:
    """Where prompt caches go unless told otherwise: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx-dsv4" / "prompt-cache"


def _encode_tokens(tokens) -> str:
    return base64.b64encode(struct.pack(f"<{len(tokens)}i", *tokens)).decode("ascii")


def _decode_tokens(text: str) -> List[int]:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 4:
        raise ValueError("token bytes are not a whole number of int32 values")
    return list(struct.unpack(f"<{len(raw) // 4}i", raw))


def read_header(path: Path) -> dict:
    """The metadata of a safetensors file, read without its arrays."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"header of {size} bytes, more than {MAX_HEADER_BYTES}")
        raw = f.read(size)
        if len(raw) != size:
            raise ValueError(f"truncated: the header announces {size} bytes, {len(raw)} follow")
        f.seek(0, os.SEEK_END)
        total = f.tell()
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if total < 8 + size + max(ends, default=0):
        raise ValueError(f"truncated: {total} bytes, the arrays need {8 + size + max(ends, default=0)}")
    return header.get("__metadata__") or {}


@dataclass
class _Entry:
    key: str
    partition: str
    tokens: List[int]
    snapshot: Optional[_Snapshot]  # None while only on disk
    nbytes: int  # of the snapshot's arrays when in memory
    path: Optional[Path]
    file_bytes: int
    last_used: int
    text: Optional[str] = None  # the decoded tokens, kept once computed


def _partition_name(partition) -> str:
    return "shared" if partition is None else str(partition)


class PrefixStore:
    def __init__(self, model, *, memory_bytes: int, directory=None, disk_bytes: Optional[int] = None):
        self.model = model
        self.fingerprint = model_fingerprint(model)
        self.memory_bytes = int(memory_bytes)
        self.disk_bytes = None if disk_bytes is None else int(disk_bytes)
        # one folder per model and cache storage: a snapshot only restores into the storage it came from
        storage = "-".join(getattr(model, "cache_dtypes", ("fp8", "fp4")))
        self.directory = Path(directory) / f"{self.fingerprint}-{storage}" if directory is not None else None
        self.counts = {"hits": 0, "misses": 0, "disk_loads": 0, "skipped_files": 0, "written": 0}
        self._entries = {}
        self._clock = 0
        self._lock = threading.RLock()
        if self.directory is not None:
            self._scan()

    # -- figures ------------------------------------------------------------------

    @property
    def memory_used(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.snapshot is not None)

    @property
    def disk_used(self) -> int:
        return sum(e.file_bytes for e in self._entries.values() if e.path is not None)

    def stats(self) -> dict:
        with self._lock:
            entries = list(self._entries.values())
            return {
                "snapshots": len(entries),
                "in_memory": sum(e.snapshot is not None for e in entries),
                "memory_bytes": self.memory_used,
                "memory_budget_bytes": self.memory_bytes,
                "disk_bytes": self.disk_used,
                "disk_budget_bytes": self.disk_bytes,
                "directory": str(self.directory) if self.directory is not None else None,
                **self.counts,
            }

    def view(self, partition=None) -> "PartitionView":
        return PartitionView(self, _partition_name(partition))

    # -- disk ---------------------------------------------------------------------

    def _key(self, partition: str, tokens) -> str:
        h = hashlib.sha256(partition.encode("utf-8") + b"\0")
        h.update(struct.pack(f"<{len(tokens)}i", *tokens))
        return h.hexdigest()[:40]

    def _skip(self, path: Path, problem: str, *, remove: bool):
        self.counts["skipped_files"] += 1
        log.warning("prompt cache %s skipped: %s%s", path, problem, "; it will be made anew" if remove else "")
        if remove:
            try:
                path.unlink()
            except OSError:
                pass

    def _scan(self):
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.warning("prompt cache folder %s cannot be used (%s): keeping prompt caches in memory only",
                        self.directory, err.strerror or err)
            self.directory = None
            return
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            try:
                meta = read_header(path)
                if meta.get("format") != PROMPT_CACHE_FORMAT:
                    raise ValueError(f"not a prompt cache of this version (format {meta.get('format')!r})")
                if meta.get("fingerprint") != self.fingerprint:
                    raise ValueError("written for another model")
                extra = json.loads(meta.get("metadata") or "{}")
                tokens = _decode_tokens(extra["prefix_tokens"])
                partition = extra["partition"]
                if not isinstance(partition, str) or not tokens:
                    raise ValueError("no partition or no tokens")
            except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
                ours = path.stem == path.stem.lower() and len(path.stem) == 40
                self._skip(path, str(err), remove=ours)
                continue
            key = self._key(partition, tokens)
            if path.stem != key:
                self._skip(path, "its name does not match its tokens", remove=False)
                continue
            stat = path.stat()
            self._entries[key] = _Entry(key, partition, tokens, None, 0, path, stat.st_size,
                                        last_used=int(stat.st_mtime_ns))
            self._clock = max(self._clock, int(stat.st_mtime_ns))
        self._enforce_disk()

    def _write(self, entry: _Entry):
        path = self.directory / (entry.key + SUFFIX)
        single = PromptCache()
        single.fingerprint = self.fingerprint
        single.snapshots = [entry.snapshot]
        try:
            save_prompt_cache(path, single, metadata={"prefix_tokens": _encode_tokens(entry.tokens),
                                                      "partition": entry.partition})
        except PromptCacheError as err:
            log.warning("prompt cache not written to disk: %s", err)
            return
        entry.path = path
        entry.file_bytes = path.stat().st_size
        self.counts["written"] += 1

    def _load(self, entry: _Entry) -> bool:
        """Bring a disk-only entry's arrays into memory; False (and the entry gone) when the file fails."""
        try:
            pc = load_prompt_cache(entry.path, self.model, strict=False)
            (snapshot,) = pc.snapshots
            if snapshot.tokens != entry.tokens:
                raise PromptCacheError(f"{entry.path}: its arrays belong to other tokens than its header names")
        except (PromptCacheError, ValueError) as err:
            self._skip(entry.path, str(err), remove=True)
            del self._entries[entry.key]
            return False
        entry.snapshot = snapshot
        entry.nbytes = snapshot_bytes(snapshot)
        self.counts["disk_loads"] += 1
        return True

    # -- budgets ------------------------------------------------------------------

    def _enforce_memory(self, keep: Optional[_Entry] = None):
        in_memory = sorted((e for e in self._entries.values() if e.snapshot is not None), key=lambda e: e.last_used)
        used = sum(e.nbytes for e in in_memory)
        for entry in in_memory:
            if used <= self.memory_bytes:
                break
            if entry is keep:
                continue
            used -= entry.nbytes
            entry.snapshot, entry.nbytes = None, 0
            if entry.path is None:
                del self._entries[entry.key]

    def _enforce_disk(self):
        if self.disk_bytes is None:
            return
        on_disk = sorted((e for e in self._entries.values() if e.path is not None), key=lambda e: e.last_used)
        used = sum(e.file_bytes for e in on_disk)
        for entry in on_disk:
            if used <= self.disk_bytes:
                break
            used -= entry.file_bytes
            try:
                entry.path.unlink()
            except OSError:
                pass
            entry.path, entry.file_bytes = None, 0
            if entry.snapshot is None:
                del self._entries[entry.key]

    # -- the PromptCache operations, per partition ---------------------------------------

    def _touch(self, entry: _Entry):
        self._clock += 1
        entry.last_used = self._clock
        if entry.path is not None:
            try:
                os.utime(entry.path)
            except OSError:
                pass

    def _candidates(self, partition: str, ids):
        found = [e for e in self._entries.values()
                 if e.partition == partition and len(e.tokens) < len(ids) and ids[:len(e.tokens)] == e.tokens]
        return sorted(found, key=lambda e: -len(e.tokens))

    def match(self, partition: str, ids) -> Optional[_Snapshot]:
        ids = list(ids)
        with self._lock:
            for entry in self._candidates(partition, ids):
                if entry.snapshot is None and not self._load(entry):
                    continue
                self._touch(entry)
                self.counts["hits"] += 1
                self._enforce_memory(keep=entry)
                return entry.snapshot
            self.counts["misses"] += 1
            return None

    def add(self, partition: str, tokens, cache, draft=None):
        """Keep the state of ``cache`` after ``tokens`` (and ``draft``, the drafter's side) in ``partition``."""
        arrays, meta = cache.to_state()
        self.add_snapshot(partition, _Snapshot(list(tokens), arrays, dict(meta), draft=draft))

    def add_snapshot(self, partition: str, snapshot: _Snapshot):
        """Keep ``snapshot`` (its arrays already checked against the model) in ``partition``."""
        tokens = snapshot.tokens
        with self._lock:
            key = self._key(partition, tokens)
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(key, partition, tokens, None, 0, None, 0, 0)
                self._entries[key] = entry
            entry.snapshot, entry.nbytes = snapshot, snapshot_bytes(snapshot)
            self._touch(entry)
            if self.directory is not None:
                self._write(entry)
            self._enforce_memory()
            self._enforce_disk()

    def encode(self, partition: str, text: str, tokenizer) -> List[int]:
        """Token ids for ``text``, keeping the stored ids of the longest prefix whose decoded
        text starts ``text`` (the model's own tokens for what it generated)."""
        with self._lock:
            entries = sorted((e for e in self._entries.values() if e.partition == partition),
                             key=lambda e: -len(e.tokens))
            for entry in entries:
                if entry.text is None:
                    entry.text = tokenizer.decode(entry.tokens)
                if len(entry.text) < len(text) and text.startswith(entry.text):
                    return list(entry.tokens) + tokenizer.encode(text[len(entry.text):], add_special_tokens=False)
        return tokenizer.encode(text, add_special_tokens=False)

    def clear(self, partition: str):
        with self._lock:
            for entry in [e for e in self._entries.values() if e.partition == partition]:
                if entry.path is not None:
                    try:
                        entry.path.unlink()
                    except OSError:
                        pass
                del self._entries[entry.key]

    def count(self, partition: str) -> int:
        return sum(e.partition == partition for e in self._entries.values())

    def latest(self, partition: str, n: int = 1) -> List[_Snapshot]:
        """The partition's ``n`` most recently used snapshots, loaded from disk if need be."""
        found = []
        with self._lock:
            for entry in sorted((e for e in self._entries.values() if e.partition == partition),
                                key=lambda e: -e.last_used):
                if len(found) == n:
                    break
                if entry.snapshot is not None or self._load(entry):
                    found.append(entry.snapshot)
        return found


class PartitionView:
    """One partition of a ``PrefixStore``, with the operations ``stream_generate`` uses."""

    strict = False

    def __init__(self, store: PrefixStore, partition: str):
        self.store = store
        self.partition = partition
        self.fingerprint = store.fingerprint
        self.metadata = {}

    def __len__(self):
        return self.store.count(self.partition)

    def check_model(self, model):
        fingerprint = model_fingerprint(model)
        if fingerprint != self.fingerprint:
            raise PromptCacheError(f"this prompt store holds caches of model {self.fingerprint}, "
                                   f"not of this model ({fingerprint})")

    def match(self, ids):
        return self.store.match(self.partition, ids)

    def restore(self, snapshot, model):
        return restore_snapshot(snapshot, model)

    def add(self, tokens, cache, draft=None):
        self.store.add(self.partition, tokens, cache, draft)

    def encode(self, text, tokenizer):
        return self.store.encode(self.partition, text, tokenizer)

    def clear(self):
        self.store.clear(self.partition)

    @property
    def tokens(self) -> List[int]:
        """The token history of the most recently used snapshot."""
        latest = self.store.latest(self.partition)
        return list(latest[0].tokens) if latest else []

    def export(self, n: int = 3) -> PromptCache:
        """A ``PromptCache`` holding the ``n`` latest snapshots, for ``save_prompt_cache``."""
        pc = PromptCache(max_snapshots=n)
        pc.fingerprint = self.fingerprint
        pc.snapshots = self.store.latest(self.partition, n)
        return pc

    def adopt(self, prompt_cache: PromptCache):
        """Take the snapshots of a loaded prompt-cache file into this partition."""
        for snapshot in prompt_cache.snapshots:
            self.store.add_snapshot(self.partition, snapshot)


__all__ = ["PrefixStore", "PartitionView", "default_directory", "read_header"]
