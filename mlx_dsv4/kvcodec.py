"""Storage formats for cached kv rows and indexer keys.

kv rows ("fp8"): the non-RoPE dims as FP8 E4M3 codes with one power-of-two
(UE8M0) scale per 64 values, the trailing RoPE dims in BF16: the precision
DeepSeek-V4 was trained with. "bf16" stores whole rows in BF16; "float" keeps
the model's compute dtype (exact, for parity checks).

Indexer keys: "fp4" is the trained format: keys and queries are rotated by the
orthonormal Walsh-Hadamard transform, then rounded to FP4 E2M1 (round to
nearest, ties to even) with one power-of-two scale per 32 values; keys are
stored as MLX mxfp4 codes. "fp8" (mxfp8), "bf16" and "float" store unrotated
keys and leave queries as they are. docs/precision.md lists the sources.
Attention always sees decode(encode(x)), in prefill and in decoding alike.
"""

import mlx.core as mx

from .memory import FP8_GROUP, INDEX_DTYPES, INDEX_GROUP, KV_DTYPES, index_row_bytes, kv_row_bytes

FP8_MAX = 448.0
FP4_MAX = 6.0


def index_rotation(kind: str) -> str:
    """How indexer keys of this kind are rotated before storage (recorded with saved caches)."""
    return "hadamard" if kind == "fp4" else "none"


def _power_of_two_at_least(v: mx.array) -> mx.array:
    """2^ceil(log2(v)) for positive normal float32 v, read off the bits (log2 rounds near powers of two)."""
    bits = mx.view(v.astype(mx.float32), mx.uint32)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).astype(mx.uint32)
    return mx.view(exponent << 23, mx.float32)


@mx.compile
def _fp8_encode(nope: mx.array):
    n = nope.shape[-1]
    groups = -(-n // FP8_GROUP)
    x = nope.astype(mx.float32)
    padded = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, groups * FP8_GROUP - n)])
    amax = mx.maximum(mx.abs(padded.reshape(*x.shape[:-1], groups, FP8_GROUP)).max(axis=-1), 1e-4)
    group_scale = _power_of_two_at_least(amax * (1 / FP8_MAX))
    scale = mx.repeat(group_scale, FP8_GROUP, axis=-1)[..., :n]
    exps = (mx.view(group_scale, mx.uint32) >> 23).astype(mx.uint8)  # UE8M0: the biased exponent
    return mx.to_fp8(x / scale), exps


@mx.compile
def _fp8_decode_f32(codes: mx.array, exps: mx.array) -> mx.array:
    n = codes.shape[-1]
    scale = mx.repeat(mx.power(2.0, exps.astype(mx.float32) - 127), FP8_GROUP, axis=-1)[..., :n]
    return mx.from_fp8(codes, mx.float32) * scale


@mx.compile
def _fp8_decode_bf16(codes: mx.array, exps: mx.array) -> mx.array:
    n = codes.shape[-1]
    scale = mx.power(2.0, exps.astype(mx.float32) - 127).astype(mx.bfloat16)[..., None]
    values = mx.from_fp8(codes, mx.bfloat16)
    return (values.reshape(*codes.shape[:-1], -1, FP8_GROUP) * scale).reshape(*codes.shape[:-1], n)


def _fp8_decode(codes: mx.array, exps: mx.array, dtype) -> mx.array:
    if dtype == mx.bfloat16 and codes.shape[-1] % FP8_GROUP == 0:
        # Straight to bfloat16, with no float32 copy of the rows (a peak of about 2x the output
        # rather than 5x): E4M3 values are exact in bfloat16, and a bfloat16 product is the
        # float32 product rounded once, as the float32 path then rounds it.
        return _fp8_decode_bf16(codes, exps)
    return _fp8_decode_f32(codes, exps).astype(dtype)


@mx.compile
def _fp4_round(x: mx.array) -> mx.array:
    """x [..., n] (n a multiple of 32) rounded to FP4 E2M1 times a power-of-two scale per 32 values, float32."""
    g = x.astype(mx.float32).reshape(*x.shape[:-1], -1, INDEX_GROUP)
    amax = mx.maximum(mx.abs(g).max(axis=-1, keepdims=True), FP4_MAX * 2.0**-126)
    scale = _power_of_two_at_least(amax * (1 / FP4_MAX))
    y = mx.clip(g / scale, -FP4_MAX, FP4_MAX)
    a = mx.abs(y)
    # E2M1 magnitudes are 0-2 in steps of 0.5, 2-4 in steps of 1, 4-6 in steps of 2; within each
    # range the code's last bit is the step count's parity, so rounding half to even there is
    # rounding to the even code.
    step = mx.where(a < 2, 0.5, mx.where(a < 4, 1.0, 2.0))
    r = mx.round(a / step) * step
    return (mx.where(y < 0, -r, r) * scale).reshape(x.shape)


def hadamard_rotate(x: mx.array) -> mx.array:
    """x times the orthonormal Walsh-Hadamard matrix (Sylvester order) over the last axis, in x's dtype."""
    return mx.hadamard_transform(x.astype(mx.float32)).astype(x.dtype)


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
    """Encodes indexer keys [..., index_head_dim] and prepares the queries scored against them."""

    _MX_MODES = {"fp4": ("mxfp4", 4), "fp8": ("mxfp8", 8)}

    def __init__(self, kind: str, head_dim: int, dtype):
        if kind not in INDEX_DTYPES:
            raise ValueError(f"index_dtype {kind!r}: expected one of {INDEX_DTYPES}")
        if kind in self._MX_MODES and head_dim % INDEX_GROUP:
            raise ValueError(f"index_dtype {kind!r} needs index_head_dim divisible by {INDEX_GROUP}, got {head_dim}")
        if kind == "fp4" and head_dim & (head_dim - 1):
            raise ValueError(f"index_dtype 'fp4' rotates by a Walsh-Hadamard matrix: index_head_dim must be "
                             f"a power of two, got {head_dim}")
        self.kind, self.head_dim, self.dtype = kind, head_dim, dtype

    def queries(self, q: mx.array) -> mx.array:
        """Indexer queries [..., d] (after RoPE) as scored against the stored keys: float32."""
        if self.kind == "fp4":
            return _fp4_round(hadamard_rotate(q))
        return q.astype(mx.float32)

    def encode(self, x: mx.array) -> tuple:
        if self.kind == "fp4":
            # The values already lie on the FP4 grid, so mxfp4 stores them exactly.
            return tuple(mx.quantize(_fp4_round(hadamard_rotate(x)), group_size=INDEX_GROUP, bits=4, mode="mxfp4"))
        if self.kind == "fp8":
            return tuple(mx.quantize(x.astype(mx.float32), group_size=INDEX_GROUP, bits=8, mode="mxfp8"))
        if self.kind == "bf16":
            return (x.astype(mx.bfloat16),)
        return (x.astype(self.dtype),)

    def decode(self, parts: tuple) -> mx.array:
        """Stored keys as the scores see them (rotated for "fp4")."""
        if self.kind in self._MX_MODES:
            mode, bits = self._MX_MODES[self.kind]
            return mx.dequantize(*parts, group_size=INDEX_GROUP, bits=bits, mode=mode).astype(self.dtype)
        return parts[0].astype(self.dtype)

    def scores(self, q: mx.array, parts: tuple) -> mx.array:
        """q [B, H, Lq, d] from `queries` against stored keys [B, T, ...] -> [B, H, Lq, T], without decoding them."""
        if self.kind in self._MX_MODES and q.shape[0] == 1:
            mode, bits = self._MX_MODES[self.kind]
            w, scales = (p[0] for p in parts)
            return mx.quantized_matmul(q, w, scales, transpose=True, group_size=INDEX_GROUP, bits=bits, mode=mode)
        return q @ self.decode(parts).astype(q.dtype)[:, None].swapaxes(-1, -2)

    def row_bytes(self) -> int:
        return index_row_bytes(self.kind, self.head_dim, self.dtype.size)
