"""Storage formats for cached kv rows and indexer keys.

kv rows ("fp8"): the non-RoPE dims as FP8 E4M3 codes with one power-of-two
(UE8M0) scale per 64 values, the trailing RoPE dims in BF16: the precision
DeepSeek-V4 was trained with. "bf16" stores whole rows in BF16; "float" keeps
the model's compute dtype (exact, for parity checks).

Indexer keys: "fp4" (MLX mxfp4, 32-value groups), "fp8" (mxfp8), "bf16", "float".
Attention always sees decode(encode(x)), in prefill and in decoding alike.
"""

import mlx.core as mx

from .memory import FP8_GROUP, index_row_bytes, kv_row_bytes

KV_DTYPES = ("fp8", "bf16", "float")
INDEX_DTYPES = ("fp4", "fp8", "bf16", "float")
FP8_MAX = 448.0


@mx.compile
def _fp8_encode(nope: mx.array):
    n = nope.shape[-1]
    groups = -(-n // FP8_GROUP)
    x = nope.astype(mx.float32)
    padded = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, groups * FP8_GROUP - n)])
    amax = mx.maximum(mx.abs(padded.reshape(*x.shape[:-1], groups, FP8_GROUP)).max(axis=-1), 1e-4)
    exp = mx.ceil(mx.log2(amax / FP8_MAX))
    scale = mx.repeat(mx.power(2.0, exp), FP8_GROUP, axis=-1)[..., :n]
    return mx.to_fp8(x / scale), (exp + 127).astype(mx.uint8)


@mx.compile
def _fp8_decode_f32(codes: mx.array, exps: mx.array) -> mx.array:
    n = codes.shape[-1]
    scale = mx.repeat(mx.power(2.0, exps.astype(mx.float32) - 127), FP8_GROUP, axis=-1)[..., :n]
    return mx.from_fp8(codes, mx.float32) * scale


def _fp8_decode(codes: mx.array, exps: mx.array, dtype) -> mx.array:
    return _fp8_decode_f32(codes, exps).astype(dtype)


class KVCodec:
    """Encodes kv rows [..., head_dim] into a tuple of arrays and back."""

    def __init__(self, kind: str, head_dim: int, rope_dim: int, dtype):
        if kind not in KV_DTYPES:
            raise ValueError(f"kv_dtype {kind!r}: expected one of {KV_DTYPES}")
        self.kind, self.head_dim, self.rope_dim, self.dtype = kind, head_dim, rope_dim, dtype

    def encode(self, x: mx.array) -> tuple:
        if self.kind == "fp8":
            codes, exps = _fp8_encode(x[..., : -self.rope_dim])
            return codes, exps, x[..., -self.rope_dim :].astype(mx.bfloat16)
        if self.kind == "bf16":
            return (x.astype(mx.bfloat16),)
        return (x.astype(self.dtype),)

    def decode(self, parts: tuple) -> mx.array:
        if self.kind == "fp8":
            codes, exps, rope = parts
            return mx.concatenate([_fp8_decode(codes, exps, self.dtype), rope.astype(self.dtype)], axis=-1)
        return parts[0].astype(self.dtype)

    def row_bytes(self) -> int:
        return kv_row_bytes(self.kind, self.head_dim, self.rope_dim, self.dtype.size)


class IndexCodec:
    """Encodes indexer keys [..., index_head_dim]."""

    _MX_MODES = {"fp4": ("mxfp4", 4), "fp8": ("mxfp8", 8)}

    def __init__(self, kind: str, head_dim: int, dtype):
        if kind not in INDEX_DTYPES:
            raise ValueError(f"index_dtype {kind!r}: expected one of {INDEX_DTYPES}")
        if kind in self._MX_MODES and head_dim % 32:
            raise ValueError(f"index_dtype {kind!r} needs index_head_dim divisible by 32, got {head_dim}")
        self.kind, self.head_dim, self.dtype = kind, head_dim, dtype

    def encode(self, x: mx.array) -> tuple:
        if self.kind in self._MX_MODES:
            mode, bits = self._MX_MODES[self.kind]
            w, scales = mx.quantize(x.astype(mx.float32), group_size=32, bits=bits, mode=mode)
            return w, scales
        if self.kind == "bf16":
            return (x.astype(mx.bfloat16),)
        return (x.astype(self.dtype),)

    def decode(self, parts: tuple) -> mx.array:
        if self.kind in self._MX_MODES:
            mode, bits = self._MX_MODES[self.kind]
            return mx.dequantize(*parts, group_size=32, bits=bits, mode=mode).astype(self.dtype)
        return parts[0].astype(self.dtype)

    def scores(self, q: mx.array, parts: tuple) -> mx.array:
        """q [B, H, Lq, d] float32 against stored keys [B, T, ...] -> [B, H, Lq, T], without decoding them."""
        if self.kind in self._MX_MODES and q.shape[0] == 1:
            mode, bits = self._MX_MODES[self.kind]
            w, scales = (p[0] for p in parts)
            return mx.quantized_matmul(q, w, scales, transpose=True, group_size=32, bits=bits, mode=mode)
        return q @ self.decode(parts).astype(q.dtype)[:, None].swapaxes(-1, -2)

    def row_bytes(self) -> int:
        return index_row_bytes(self.kind, self.head_dim, self.dtype.size)
