"""Sharded safetensors input: header validation, the index, and positioned tensor reads.

Headers are parsed here rather than with a library so FP8/E8M0 tensors can be read as raw
bytes, and so a damaged file yields an error naming the file, tensor and byte offset.
Tensors are read one at a time with positioned reads (no mmap), which keeps resident
memory at the size of what is being converted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConvertError

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 << 20

# safetensors dtype -> (numpy storage dtype, itemsize); BF16 and FP8 are read as raw bits
DTYPES = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "U32": ("<u4", 4),
    "F8_E4M3": ("u1", 1),
    "F8_E8M0": ("u1", 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
INT_DTYPES = {"I64", "I32", "I16", "I8", "U8", "U32"}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str
    shape: tuple
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def _fail(path, msg, tensor=None):
    where = f"{path}: tensor {tensor!r}: " if tensor else f"{path}: "
    raise ConvertError(where + msg)


def read_header(path: Path) -> dict[str, TensorEntry]:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                _fail(path, f"truncated: {size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                _fail(path, f"corrupt or truncated: header length {n} at byte offset 0 exceeds "
                      f"the file size of {size} bytes")
            raw = f.read(n)
    except OSError as e:
        _fail(path, f"cannot read: {e.strerror or e}")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        _fail(path, f"corrupt safetensors header (bytes 8..{8 + n}): {e}")
    data_start = 8 + n
    data_size = size - data_start
    entries = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            _fail(path, "malformed header entry (needs dtype, shape, data_offsets)", name)
        if dtype not in DTYPES:
            _fail(path, f"unsupported dtype {dtype} (supported: {', '.join(sorted(DTYPES))})", name)
        need = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
        if end - begin != need or begin < 0:
            _fail(path, f"data_offsets [{begin}, {end}) hold {end - begin} bytes but {dtype}{list(shape)} "
                  f"needs {need}", name)
        if end > data_size:
            _fail(path, f"data ends at byte offset {data_start + end} but the file has only {size} "
                  "bytes (truncated)", name)
        spans.append((begin, end, name))
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, need)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            _fail(path, f"corrupt header: data of {n1!r} overlaps {n0!r} at byte offset {data_start + b1}")
    return entries


class Checkpoint:
    """All tensors of a sharded (or single-file) safetensors checkpoint directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.entries: dict[str, TensorEntry] = {}
        self.files: list[Path] = []
        index = self.root / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
                assert isinstance(weight_map, dict)
            except OSError as e:
                raise ConvertError(f"{index}: cannot read: {e.strerror or e}") from None
            except (ValueError, KeyError, TypeError, AssertionError) as e:
                raise ConvertError(f"{index}: corrupt index (needs a 'weight_map' object): {e}") from None
            by_file: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                if not isinstance(fname, str) or not fname or Path(fname).name != fname:
                    raise ConvertError(f"{index}: weight_map[{name!r}] = {fname!r}: must be the name of a "
                                       "shard file in the same directory")
                by_file.setdefault(fname, []).append(name)
            for fname, names in sorted(by_file.items()):
                path = self.root / fname
                if not path.exists():
                    more = f" and {len(names) - 1} others" if len(names) > 1 else ""
                    raise ConvertError(f"{path}: missing shard (listed in {INDEX_NAME} for tensor "
                                       f"{names[0]!r}{more})")
                header = read_header(path)
                for name in names:
                    if name not in header:
                        raise ConvertError(f"{path}: tensor {name!r} is listed in {INDEX_NAME} for this "
                                           "shard but the shard does not contain it")
                self._add(path, header)
        else:
            shards = sorted(p for p in self.root.glob("*.safetensors"))
            if not shards:
                raise ConvertError(f"{self.root}: no *.safetensors files and no {INDEX_NAME}")
            for path in shards:
                self._add(path, read_header(path))

    def _add(self, path, header):
        self.files.append(path)
        for name, entry in header.items():
            if name in self.entries and self.entries[name].file != path:
                raise ConvertError(f"{path}: tensor {name!r} also stored in {self.entries[name].file}")
            self.entries[name] = entry

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str) -> np.ndarray:
        """The tensor in its storage dtype (BF16 as uint16 bits, FP8/E8M0 as uint8)."""
        e = self.entries[name]
        buf = np.empty(e.nbytes, dtype=np.uint8)
        try:
            with open(e.file, "rb", buffering=0) as f:
                f.seek(e.start)
                got = f.readinto(memoryview(buf))
        except OSError as err:
            raise ConvertError(f"{e.file}: tensor {name!r}: read failed at byte offset {e.start}: {err}") from None
        if got != e.nbytes:
            raise ConvertError(f"{e.file}: tensor {name!r}: truncated, got {got} of {e.nbytes} bytes "
                               f"at byte offset {e.start}")
        return buf.view(DTYPES[e.dtype][0]).reshape(e.shape)

    def read_float(self, name: str) -> np.ndarray:
        e = self.entries[name]
        return to_float32(self.read(name), e.dtype)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)
