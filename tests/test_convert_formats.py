"""The stored formats of the release map exactly onto MLX's mxfp8/mxfp4 layouts."""

import math

import mlx.core as mx
import numpy as np
import pytest

from convert_fixtures import E4M3, decode_fp4, decode_fp8, encode_fp4, encode_fp8
from mlx_dsv4.convert import formats
from mlx_dsv4.convert.transform import float32_to_bf16_bits


def test_e4m3_table_matches_reference_decoding():
    ours = formats.E4M3_VALUES.astype(np.float64)
    assert np.array_equal(np.isnan(ours), np.isnan(E4M3))
    assert np.isnan(E4M3).sum() == 2  # 0x7F and 0xFF only: the "fn" variant has no infinities
    ok = ~np.isnan(E4M3)
    assert np.array_equal(ours[ok], E4M3[ok])
    assert E4M3[0x7E] == 448.0 and E4M3[0x01] == 2.0 ** -9


@pytest.mark.parametrize("n,k", [(256, 256), (160, 288), (40, 96)])
def test_fp8_block_scales_map_bit_exactly_onto_mxfp8(n, k):
    rng = np.random.default_rng(n + k)
    codes = rng.integers(0, 256, (n, k), dtype=np.int64).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes in real weights
    codes[0, :256 if k >= 256 else k] = np.arange(256)[: min(k, 256)] % 0x7F  # every finite positive code
    grid = (math.ceil(n / 128), math.ceil(k / 128))
    scales = rng.integers(110, 140, grid).astype(np.uint8)
    wq, sq = formats.fp8_to_mxfp8(codes, scales)
    assert wq.dtype == np.uint32 and wq.shape == (n, k // 4)
    assert sq.dtype == np.uint8 and sq.shape == (n, k // 32)
    got = mx.dequantize(mx.array(wq), mx.array(sq), group_size=32, bits=8, mode="mxfp8", dtype=mx.float32)
    want = decode_fp8(codes, scales)
    assert np.array_equal(np.array(got), want)
    assert np.array_equal(formats.dequant_fp8(codes, scales), want)


@pytest.mark.parametrize("n,k", [(64, 64), (33, 96)])
def test_fp4_row_scales_map_bit_exactly_onto_mxfp4(n, k):
    rng = np.random.default_rng(k)
    packed = rng.integers(-128, 128, (n, k // 2)).astype(np.int8)
    packed[0, :8] = np.array([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE], dtype=np.uint8).view(np.int8)
    scales = rng.integers(115, 135, (n, k // 32)).astype(np.uint8)
    wq, sq = formats.fp4_to_mxfp4(packed, scales)
    assert wq.shape == (n, k // 8) and sq.shape == (n, k // 32)
    got = mx.dequantize(mx.array(wq), mx.array(sq), group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    want = decode_fp4(packed, scales)
    assert np.array_equal(np.array(got), want)
    assert np.array_equal(formats.dequant_fp4(packed, scales), want)
    # low nibble first: byte 0x10 holds element 0 = code 0 and element 1 = code 1 (0.5 * scale)
    assert want[0, 1] == 0.5 * 2.0 ** (int(scales[0, 0]) - 127)


def test_ragged_fp4_scale_grid_decodes():
    w = np.random.default_rng(1).normal(size=(5, 48)).astype(np.float32)
    packed, scales = encode_fp4(w)
    assert scales.shape == (5, 2)  # ceil(48 / 32)
    assert np.array_equal(formats.dequant_fp4(packed, scales), decode_fp4(packed, scales))


def test_fixture_encoders_reproduce_known_floats():
    w = np.random.default_rng(2).normal(0, 0.05, (130, 200)).astype(np.float32)
    codes, scales = encode_fp8(w)
    assert scales.shape == (2, 2)
    assert np.abs(decode_fp8(codes, scales) - w).max() <= np.abs(w).max() * 2 ** -4
    packed, s4 = encode_fp4(w[:, :192])
    assert np.abs(decode_fp4(packed, s4) - w[:, :192]).max() <= np.abs(w).max() * 0.25


def test_e8m0_and_power_of_two_scales():
    b = np.array([0, 1, 127, 128, 254, 255], np.uint8)
    f = formats.e8m0_to_float(b)
    assert f[2] == 1.0 and f[3] == 2.0 and f[4] == 2.0 ** 127 and np.isnan(f[5])
    assert np.array_equal(formats.float_scale_to_e8m0(np.array([1.0, 0.25, 2.0 ** 100], np.float32)),
                          np.array([127, 125, 227], np.uint8))
    assert formats.float_scale_to_e8m0(np.array([1.0, 0.3], np.float32)) is None


def test_bf16_rounding_matches_mlx():
    x = np.random.default_rng(3).normal(size=4096).astype(np.float32) * 1e3
    ours = float32_to_bf16_bits(x)
    theirs = np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    assert np.array_equal(ours, theirs)
