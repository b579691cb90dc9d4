"""Per-layer decoding state: the sliding window of raw kv rows and the
compressor state (incomplete window, overlap half, compressed entries)."""

from typing import List, Optional

import mlx.core as mx

_ENTRY_STEP = 256


class CompressorState:
    """State of one compressor (the attention's, or the lightning indexer's)."""

    def __init__(self):
        self.pending_kv: Optional[mx.array] = None  # [B, < ratio, c*d] tokens of the open window
        self.pending_gate: Optional[mx.array] = None
        self.prev_kv: Optional[mx.array] = None  # [B, ratio, d] Ca halves of the last closed window
        self.prev_gate: Optional[mx.array] = None
        self._entries: Optional[mx.array] = None  # [B, capacity, d]
        self.n_entries = 0

    @property
    def entries(self) -> Optional[mx.array]:
        if self._entries is None:
            return None
        return self._entries[:, : self.n_entries]

    def append(self, new: mx.array) -> None:
        n = new.shape[1]
        if n == 0:
            return
        end = self.n_entries + n
        if self._entries is None or end > self._entries.shape[1]:
            capacity = ((end + _ENTRY_STEP - 1) // _ENTRY_STEP) * _ENTRY_STEP
            grown = mx.zeros((new.shape[0], capacity, new.shape[2]), dtype=new.dtype)
            if self._entries is not None and self.n_entries:
                grown[:, : self.n_entries] = self._entries[:, : self.n_entries]
            self._entries = grown
        self._entries[:, self.n_entries : end] = new
        self.n_entries = end

    _FIELDS = ("pending_kv", "pending_gate", "prev_kv", "prev_gate", "entries")

    def arrays(self) -> List[mx.array]:
        return [a for a in (getattr(self, f) for f in self._FIELDS) if a is not None]

    def to_state(self, prefix: str, out: dict) -> None:
        for f in self._FIELDS:
            value = getattr(self, f)
            if value is not None:
                out[f"{prefix}.{f}"] = value

    def load_state(self, prefix: str, arrays: dict) -> None:
        for f in self._FIELDS[:-1]:
            setattr(self, f, arrays.get(f"{prefix}.{f}"))
        self._entries = arrays.get(f"{prefix}.entries")
        self.n_entries = 0 if self._entries is None else self._entries.shape[1]


class LayerCache:
    def __init__(self, sliding_window: int, ratio: int):
        self.sliding_window = sliding_window
        self.ratio = ratio
        self.offset = 0
        self.window: Optional[mx.array] = None  # [B, <= sliding_window - 1, hd]
        self.compressor = CompressorState() if ratio else None
        self.indexer = CompressorState() if ratio == 4 else None

    def update_window(self, kv: mx.array):
        """Append this step's kv rows; return (keys, absolute position of keys[:, 0])."""
        if self.window is None:
            keys, first = kv, self.offset
        else:
            keys, first = mx.concatenate([self.window, kv], axis=1), self.offset - self.window.shape[1]
        # The next query sees at most sliding_window - 1 earlier rows.
        self.window = keys[:, -(self.sliding_window - 1) :]
        return keys, first

    def arrays(self) -> List[mx.array]:
        out = [self.window] if self.window is not None else []
        for state in (self.compressor, self.indexer):
            if state is not None:
                out += state.arrays()
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def to_state(self, prefix: str, out: dict) -> None:
        if self.window is not None:
            out[f"{prefix}.window"] = self.window
        for name in ("compressor", "indexer"):
            state = getattr(self, name)
            if state is not None:
                state.to_state(f"{prefix}.{name}", out)

    def load_state(self, prefix: str, arrays: dict, offset: int) -> None:
        self.offset = offset
        self.window = arrays.get(f"{prefix}.window")
        for name in ("compressor", "indexer"):
            state = getattr(self, name)
            if state is not None:
                state.load_state(f"{prefix}.{name}", arrays)


class ModelCache:
    def __init__(self, layers: List[LayerCache]):
        self.layers = layers

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def state(self) -> List[mx.array]:
        return [a for layer in self.layers for a in layer.arrays()]

    def to_state(self):
        """(arrays, metadata) that `load_state` restores exactly; metadata values are strings."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            layer.to_state(f"layers.{i}", arrays)
        meta = {"offset": str(self.offset), "ratios": ",".join(str(l.ratio) for l in self.layers)}
        return arrays, meta

    def load_state(self, arrays: dict, meta: dict) -> None:
        ratios = ",".join(str(l.ratio) for l in self.layers)
        if meta.get("ratios") != ratios:
            raise ValueError(f"cache was saved for layer schedule [{meta.get('ratios')}], this model has [{ratios}]")
        for i, layer in enumerate(self.layers):
            layer.load_state(f"layers.{i}", arrays, int(meta["offset"]))
