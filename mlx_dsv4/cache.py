"""Per-layer decoding state.

- The raw window: a ring buffer of `sliding_window` encoded kv rows.
- Per compressor (the attention's, and for ratio 4 the indexer's): the open
  window's projected tokens, the overlap half of the last closed window
  (ratio 4), and the encoded compressed entries.

Memory grows only with compressed entries: 1/4 or 1/128 of the tokens.
"""

import re
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from .kvcodec import IndexCodec, KVCodec, index_rotation
from .memory import ENTRY_STEP
from .paths import device_paths
from .spec import compressor_width

Layout = Dict[str, Tuple[tuple, mx.Dtype]]  # array name -> (shape, dtype)


def _assign(parts: tuple, index, new_parts: tuple) -> None:
    for part, new in zip(parts, new_parts):
        part[:, index] = new


def _own(a: mx.array) -> mx.array:
    """A distinct array object: storage is updated in place, so snapshots must not alias it."""
    return mx.array(a)


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _parts_layout(codec, name: str, batch: int, rows: int, out: Layout) -> None:
    """The (shape, dtype) of each stored part of ``rows`` rows encoded by ``codec``."""
    probe = codec.encode(mx.zeros((batch, 1, codec.head_dim), dtype=codec.dtype))
    for i, part in enumerate(probe):
        out[f"{name}.{i}"] = ((batch, rows, *part.shape[2:]), part.dtype)


class CompressorState:
    """One compressor's state; `codec` turns entries into stored arrays and back."""

    _RAW = ("pending_kv", "pending_gate", "prev_kv", "prev_gate")

    def __init__(self, codec):
        self.codec = codec
        self.pending_kv: Optional[mx.array] = None  # [B, < ratio, c*d] tokens of the open window
        self.pending_gate: Optional[mx.array] = None
        self.prev_kv: Optional[mx.array] = None  # [B, ratio, d] Ca halves of the last closed window
        self.prev_gate: Optional[mx.array] = None
        self._parts: Optional[tuple] = None  # encoded entries, [B, capacity, ...] each
        self.n_entries = 0

    def append(self, rows: mx.array) -> None:
        n = rows.shape[1]
        if n == 0:
            return
        encoded = self.codec.encode(rows)
        end = self.n_entries + n
        if self._parts is None or end > self._parts[0].shape[1]:
            capacity = -(-end // ENTRY_STEP) * ENTRY_STEP
            grown = []
            for i, new in enumerate(encoded):
                g = mx.zeros((new.shape[0], capacity, *new.shape[2:]), dtype=new.dtype)
                if self._parts is not None and self.n_entries:
                    g[:, : self.n_entries] = self._parts[i][:, : self.n_entries]
                grown.append(g)
            self._parts = tuple(grown)
        _assign(self._parts, slice(self.n_entries, end), encoded)
        self.n_entries = end

    def parts(self) -> tuple:
        return tuple(p[:, : self.n_entries] for p in self._parts)

    def entries(self, first: int = 0, end: Optional[int] = None) -> Optional[mx.array]:
        """Entries first..end (default: all), decoded: [B, end - first, d]."""
        end = self.n_entries if end is None else end
        if end <= first:
            return None
        return self.codec.decode(tuple(p[:, first:end] for p in self._parts))

    def scores(self, q: mx.array, first: int = 0, end: Optional[int] = None) -> mx.array:
        """q [B, H, Lq, d] against entries first..end (default: all): [B, H, Lq, end - first] (indexer keys)."""
        end = self.n_entries if end is None else end
        parts = tuple(p[:, first:end] for p in self._parts)
        if device_paths().index_scores == "dequantize":
            return q @ self.codec.decode(parts).astype(q.dtype)[:, None].swapaxes(-1, -2)
        return self.codec.scores(q, parts)

    def gather(self, indices: mx.array) -> mx.array:
        """Entries picked per query: indices [B, Lq, k] -> decoded [B, Lq, k, d]."""
        b = mx.arange(indices.shape[0])[:, None, None]
        return self.codec.decode(tuple(p[b, indices] for p in self._parts))

    def arrays(self) -> List[mx.array]:
        out = [a for a in (getattr(self, f) for f in self._RAW) if a is not None]
        return out + list(self._parts or ())

    def to_state(self, prefix: str, out: dict) -> None:
        for f in self._RAW:
            value = getattr(self, f)
            if value is not None:
                out[f"{prefix}.{f}"] = value
        if self.n_entries:
            for i, p in enumerate(self.parts()):
                out[f"{prefix}.entries.{i}"] = p

    def layout(self, prefix: str, ratio: int, offset: int, batch: int, activation_dtype, out: Layout) -> None:
        """What ``to_state`` stores after ``offset`` tokens went through a compressor of ``ratio``."""
        if not offset:
            return
        d = self.codec.head_dim
        width = compressor_width(ratio, d)
        out[f"{prefix}.pending_kv"] = ((batch, offset % ratio, width), activation_dtype)
        out[f"{prefix}.pending_gate"] = ((batch, offset % ratio, width), mx.float32)
        if width > d and offset >= ratio:  # overlapping windows keep the last closed one's Ca half
            out[f"{prefix}.prev_kv"] = ((batch, ratio, d), activation_dtype)
            out[f"{prefix}.prev_gate"] = ((batch, ratio, d), mx.float32)
        if offset // ratio:
            _parts_layout(self.codec, f"{prefix}.entries", batch, offset // ratio, out)

    def load_state(self, prefix: str, arrays: dict) -> None:
        for f in self._RAW:
            setattr(self, f, arrays.get(f"{prefix}.{f}"))
        parts, i = [], 0
        while f"{prefix}.entries.{i}" in arrays:
            parts.append(_own(arrays[f"{prefix}.entries.{i}"]))
            i += 1
        self._parts = tuple(parts) or None
        self.n_entries = parts[0].shape[1] if parts else 0


class LayerCache:
    def __init__(self, sliding_window: int, ratio: int, kv_codec: KVCodec, index_codec: Optional[IndexCodec],
                 keep_all_rows: bool = False):
        self.sliding_window = sliding_window
        self.ratio = ratio
        self.kv_codec = kv_codec
        self.keep_all_rows = keep_all_rows  # baseline mode: every raw row is kept, none recycled
        self.offset = 0
        self._ring: Optional[tuple] = None  # encoded rows; position p lives in slot p % sliding_window
        # The ring's rows decoded (activation dtype, same slots): each row is decoded once, when
        # written, instead of the whole window at every step. Derived: not part of the state.
        self._window: Optional[mx.array] = None
        self.compressor = CompressorState(kv_codec) if ratio else None
        self.indexer = CompressorState(index_codec) if ratio == 4 else None

    def window_keys(self, kv: mx.array):
        """Store this step's kv rows; return (keys, position of keys[:, 0]).

        keys = the up to sliding_window - 1 earlier rows followed by kv, all as stored
        (decode(encode(.))), so prefill and decoding attend to the same values.
        """
        encoded = self.kv_codec.encode(kv)
        rounded = self.kv_codec.decode(encoded)
        if self.keep_all_rows:
            self._ring = encoded if self._ring is None else tuple(
                mx.concatenate([old, n], axis=1) for old, n in zip(self._ring, encoded))
            return self.kv_codec.decode(self._ring), 0
        W, start, L = self.sliding_window, self.offset, kv.shape[1]
        first = max(0, start - (W - 1))
        if start > first:
            keys = mx.concatenate([self.window_rows(mx.arange(first, start) % W), rounded], axis=1)
        else:
            keys = rounded
        if self._ring is None:
            zeros = mx.zeros((kv.shape[0], W, kv.shape[2]), dtype=kv.dtype)
            self._ring = tuple(mx.array(p) for p in self.kv_codec.encode(zeros))
            self._window = self.kv_codec.decode(self._ring)
        keep = min(L, W)
        slots = mx.arange(start + L - keep, start + L) % W
        _assign(self._ring, slots, tuple(p[:, L - keep :] for p in encoded))
        self._window[:, slots] = rounded[:, L - keep :]
        return keys, first

    def window_rows(self, slots: mx.array) -> mx.array:
        """The window's rows in ``slots``, decoded: [B, len(slots), head_dim]."""
        return self._window[:, slots]

    def arrays(self) -> List[mx.array]:
        out = list(self._ring or ()) + ([self._window] if self._window is not None else [])
        for state in (self.compressor, self.indexer):
            if state is not None:
                out += state.arrays()
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def to_state(self, prefix: str, out: dict) -> None:
        for i, p in enumerate(self._ring or ()):
            out[f"{prefix}.ring.{i}"] = _own(p)
        for name in ("compressor", "indexer"):
            state = getattr(self, name)
            if state is not None:
                state.to_state(f"{prefix}.{name}", out)

    def layout(self, prefix: str, offset: int, batch: int, activation_dtype, out: Layout) -> None:
        """What ``to_state`` stores after ``offset`` tokens."""
        if offset:
            rows = offset if self.keep_all_rows else self.sliding_window
            _parts_layout(self.kv_codec, f"{prefix}.ring", batch, rows, out)
        for name in ("compressor", "indexer"):
            state = getattr(self, name)
            if state is not None:
                state.layout(f"{prefix}.{name}", self.ratio, offset, batch, activation_dtype, out)

    def load_state(self, prefix: str, arrays: dict, offset: int) -> None:
        self.offset = offset
        ring, i = [], 0
        while f"{prefix}.ring.{i}" in arrays:
            ring.append(_own(arrays[f"{prefix}.ring.{i}"]))
            i += 1
        self._ring = tuple(ring) or None
        self._window = self.kv_codec.decode(self._ring) if self._ring and not self.keep_all_rows else None
        for name in ("compressor", "indexer"):
            state = getattr(self, name)
            if state is not None:
                state.load_state(f"{prefix}.{name}", arrays)


class ModelCache:
    def __init__(self, layers: List[LayerCache], kv_dtype: str, index_dtype: str, query_block: Optional[int]):
        self.layers = layers
        self.kv_dtype = kv_dtype
        self.index_dtype = index_dtype
        self.query_block = query_block  # None: all queries of a step at once (dense baseline)

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def state(self) -> List[mx.array]:
        return [a for layer in self.layers for a in layer.arrays()]

    def _signature(self) -> str:
        return ",".join(str(layer.ratio) for layer in self.layers)

    def to_state(self):
        """(arrays, metadata) that `load_state` restores exactly; metadata values are strings."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            layer.to_state(f"layers.{i}", arrays)
        meta = {
            "offset": str(self.offset),
            "ratios": self._signature(),
            "kv_dtype": self.kv_dtype,
            "index_dtype": self.index_dtype,
            "index_rotation": index_rotation(self.index_dtype),
        }
        return arrays, meta

    def layout(self, offset: int, batch: int = 1, activation_dtype=None) -> Layout:
        """The name, shape and dtype of every array ``to_state`` returns after ``offset`` tokens
        of a batch of ``batch`` sequences. ``activation_dtype``: that of the hidden states the
        compressors project (default: the dtype the kv codec decodes to, the model's)."""
        if activation_dtype is None and self.layers:
            activation_dtype = self.layers[0].kv_codec.dtype
        out = {}
        for i, layer in enumerate(self.layers):
            layer.layout(f"layers.{i}", offset, batch, activation_dtype, out)
        return out

    def check_state(self, arrays: dict, meta: dict, batch: int = 1, activation_dtype=None) -> int:
        """Raise ``ValueError`` naming the first way (arrays, meta) differ from what ``to_state``
        gives for this cache (see ``layout``); the offset they hold otherwise."""
        if not isinstance(meta, dict):
            raise ValueError(f"the cache metadata must be an object, got {type(meta).__name__}")
        expected_meta = ("offset", "ratios", "kv_dtype", "index_dtype", "index_rotation")
        unknown = sorted(str(k) for k in meta if k not in expected_meta)
        if unknown:
            raise ValueError(f"unknown cache metadata field(s): {', '.join(unknown)}")
        for key in expected_meta:
            if not isinstance(meta.get(key), str):
                raise ValueError(f"cache metadata field {key!r} must be a string, got {meta.get(key)!r}")
        if meta["ratios"] != self._signature():
            raise ValueError(
                f"cache was saved for layer schedule [{meta['ratios']}], this model has [{self._signature()}]"
            )
        for key in ("kv_dtype", "index_dtype"):
            if meta[key] != getattr(self, key):
                raise ValueError(f"cache was saved with {key}={meta[key]!r}, this cache uses {getattr(self, key)!r}")
        if meta["index_rotation"] != index_rotation(self.index_dtype):
            raise ValueError(f"cache was saved with indexer keys rotated by {meta['index_rotation']!r}, this cache "
                             f"rotates them by {index_rotation(self.index_dtype)!r}")
        if not re.fullmatch(r"0|[1-9][0-9]{0,17}", meta["offset"]):
            raise ValueError(f"cache metadata field 'offset' must be a token count, got {meta['offset']!r}")
        offset = int(meta["offset"])
        expected = self.layout(offset, batch, activation_dtype)
        missing = [k for k in expected if k not in arrays]
        if missing:
            raise ValueError(f"array {missing[0]} is missing (a cache of {offset} tokens has {len(expected)} arrays)")
        unexpected = sorted(str(k) for k in arrays if k not in expected)
        if unexpected:
            raise ValueError(f"unexpected array {unexpected[0]} (a cache of {offset} tokens has {len(expected)} arrays)")
        for name, (shape, dtype) in expected.items():
            value = arrays[name]
            if not isinstance(value, mx.array):
                raise ValueError(f"array {name} is a {type(value).__name__}, not an MLX array")
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(f"array {name} has shape {tuple(value.shape)} and dtype {_dtype_name(value.dtype)}; "
                                 f"a cache of {offset} tokens holds shape {shape} and dtype {_dtype_name(dtype)} there")
        return offset

    def load_state(self, arrays: dict, meta: dict) -> None:
        """Restore what ``to_state`` returned (``check_state`` checks arrays from elsewhere)."""
        if meta.get("ratios") != self._signature():
            raise ValueError(
                f"cache was saved for layer schedule [{meta.get('ratios')}], this model has [{self._signature()}]"
            )
        for key in ("kv_dtype", "index_dtype"):
            if meta.get(key) != getattr(self, key):
                raise ValueError(f"cache was saved with {key}={meta.get(key)!r}, this cache uses {getattr(self, key)!r}")
        # Caches saved before indexer keys were rotated carry no rotation and hold unrotated fp4 keys.
        saved, ours = meta.get("index_rotation", "none"), index_rotation(self.index_dtype)
        if saved != ours:
            raise ValueError(f"cache was saved with indexer keys rotated by {saved!r}, this cache rotates them by "
                             f"{ours!r} (index_dtype={self.index_dtype!r}); rebuild it")
        for i, layer in enumerate(self.layers):
            layer.load_state(f"layers.{i}", arrays, int(meta["offset"]))
