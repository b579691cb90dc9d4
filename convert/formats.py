"""Stored number formats of the release and their mapping onto MLX quantised layouts.

FP8 E4M3 (OCP "fn": no infinities, S.1111.111 is NaN), UE8M0 scales (2**(byte-127),
255 is NaN), FP4 E2M1 packed two per byte with the low nibble first.  MLX's ``mxfp8``
and ``mxfp4`` modes store the same codes in uint32 words (little-endian, element 0 in
the lowest bits) with one UE8M0 byte per 32 consecutive elements of a row, so the
release's bits can be moved over without decoding them.
"""

from __future__ import annotations

import numpy as np

FP8_BLOCK = 128
MX_GROUP = 32


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    normal = (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = (man / 8.0) * np.exp2(-6.0)
    vals = sign * np.where(exp == 0, subnormal, normal)
    vals[(exp == 0xF) & (man == 0x7)] = np.nan
    return vals.astype(np.float32)


E4M3_VALUES = _e4m3_table()
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


def e8m0_to_float(scale_bytes: np.ndarray) -> np.ndarray:
    s = np.asarray(scale_bytes, dtype=np.uint8).astype(np.int32)
    out = np.ldexp(np.float32(1.0), np.minimum(s, 254) - 127).astype(np.float32)
    out[s == 255] = np.nan
    return out


def float_scale_to_e8m0(scales: np.ndarray) -> np.ndarray | None:
    """Exact power-of-two float scales -> UE8M0 bytes; None when any value is not one."""
    s = np.asarray(scales, dtype=np.float32)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        return None
    mant, exp = np.frexp(s)
    if not np.all(mant == 0.5):
        return None
    e = exp.astype(np.int32) - 1 + 127
    if np.any(e < 0) or np.any(e > 254):
        return None
    return e.astype(np.uint8)


def expand_block_scales(block: np.ndarray, rows: int, cols: int, block_size: int = FP8_BLOCK) -> np.ndarray:
    """[ceil(rows/B), ceil(cols/B)] block grid -> one entry per element [rows, cols]."""
    return np.repeat(np.repeat(block, block_size, axis=0)[:rows], block_size, axis=1)[:, :cols]


def dequant_fp8(codes: np.ndarray, block_scale: np.ndarray, block_size: int = FP8_BLOCK) -> np.ndarray:
    n, k = codes.shape
    scale = block_scale if block_scale.dtype == np.float32 else e8m0_to_float(block_scale)
    vals = E4M3_VALUES[codes.astype(np.uint8)]
    vals *= expand_block_scales(scale, n, k, block_size)
    return vals


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """[N, K/2] bytes -> [N, K] codes 0..15, element 2j from the low nibble."""
    p = packed.astype(np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def dequant_fp4(packed: np.ndarray, row_scale: np.ndarray, group: int = MX_GROUP) -> np.ndarray:
    codes = unpack_fp4(packed)
    n, k = codes.shape
    scale = row_scale if row_scale.dtype == np.float32 else e8m0_to_float(row_scale)
    vals = E2M1_VALUES[codes]
    vals *= np.repeat(scale, group, axis=1)[:, :k]
    return vals


def fp8_to_mxfp8(codes: np.ndarray, block_scale_bytes: np.ndarray, block_size: int = FP8_BLOCK):
    """FP8 [N, K] + UE8M0 block grid -> MLX mxfp8 (uint32 [N, K/4], uint8 [N, K/32]); K % 32 == 0."""
    n, k = codes.shape
    assert k % MX_GROUP == 0 and block_size % MX_GROUP == 0
    packed = np.ascontiguousarray(codes.astype(np.uint8, copy=False)).view("<u4")
    per = block_size // MX_GROUP
    scales = np.repeat(np.repeat(block_scale_bytes, block_size, axis=0)[:n], per, axis=1)[:, : k // MX_GROUP]
    return packed, np.ascontiguousarray(scales, dtype=np.uint8)


def fp4_to_mxfp4(packed_bytes: np.ndarray, row_scale_bytes: np.ndarray):
    """FP4 [N, K/2] + UE8M0 [N, K/32] -> MLX mxfp4 (uint32 [N, K/8], uint8 [N, K/32]); K % 32 == 0."""
    packed = np.ascontiguousarray(packed_bytes.view(np.uint8)).view("<u4")
    return packed, np.ascontiguousarray(row_scale_bytes, dtype=np.uint8)
