"""Stored formats bit for bit against the torch simulation of DeepSeek's inference code (tests/parity.py)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.config import ModelArgs
from mlx_dsv4.kvcodec import IndexCodec, KVCodec, _fp4_round, hadamard_rotate
from mlx_dsv4.model import Model
from mlx_dsv4.tiny import tiny_config
from parity import fp4_simulated, kv_row_simulated, walsh_hadamard

E4M3_TIES = [1.0625, 1.1875, 3.25, 3.75, 2.0**-9 * 1.5, 2.0**-9 * 2.5]  # halfway between E4M3 neighbours (incl. subnormal)
E2M1_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # halfway between E2M1 neighbours


def rows_with_edge_cases(rng, n_rows: int, width: int, group: int, top: float, ties) -> np.ndarray:
    """Random rows over a wide range of magnitudes, plus groups whose scale sits on or just above a power
    of two, groups of exact rounding ties, tiny and all-zero groups."""
    x = rng.standard_normal((n_rows, width)) * np.exp(rng.uniform(-12, 6, (n_rows, 1)))
    g = x.reshape(n_rows, -1, group)
    for r in range(0, n_rows, 7):
        k = float(rng.integers(-12, 12))
        amax = np.float32(top * 2.0**k)
        for _ in range(r % 3):  # on top * 2^k, or one or two float32 steps above it
            amax = np.nextafter(amax, np.float32(np.inf))
        g[r, :, 0] = amax
        g[r, :, 1:] = rng.standard_normal(g[r, :, 1:].shape) * 2.0**k
    for r in range(3, n_rows, 7):
        scale = 2.0 ** float(rng.integers(-6, 6))
        g[r] = rng.choice(ties, g[r].shape) * rng.choice([-1, 1], g[r].shape) * scale
        g[r, :, 0] = top * scale
    g[5::7] *= 1e-25
    g[6::14] = 0.0
    return g.reshape(n_rows, width).astype(np.float32)


def as_torch(x: np.ndarray):
    import torch

    return torch.from_numpy(np.array(x, dtype=np.float32))


@pytest.mark.parametrize("head_dim, rope_dim", [(64, 16), (512, 64)], ids=["tiny", "v4"])
def test_fp8_rows_equal_the_trained_simulation(head_dim, rope_dim):
    x = rows_with_edge_cases(np.random.default_rng(0), 2000, head_dim - rope_dim, 64 if head_dim > 64 else 48,
                             448.0, E4M3_TIES)
    rows = np.concatenate([x, np.random.default_rng(1).standard_normal((2000, rope_dim)).astype(np.float32)], axis=1)
    codec = KVCodec("fp8", head_dim, rope_dim, mx.float32)
    ours = np.array(codec.decode(codec.encode(mx.array(rows))))
    expect = kv_row_simulated(as_torch(rows), rope_dim).numpy()
    assert np.array_equal(ours, expect), f"{int((ours != expect).sum())} values differ"


def test_fp4_rounding_equals_the_trained_simulation():
    x = rows_with_edge_cases(np.random.default_rng(2), 4000, 128, 32, 6.0, E2M1_TIES)
    ours = np.array(_fp4_round(mx.array(x)))
    expect = fp4_simulated(as_torch(x)).numpy()
    assert np.array_equal(ours, expect), f"{int((ours != expect).sum())} values differ"


@pytest.mark.parametrize("n", [32, 128])
def test_rotation_is_the_orthonormal_walsh_hadamard_matrix(n):
    x = np.random.default_rng(3).standard_normal((64, n)).astype(np.float32)
    rotated = np.array(hadamard_rotate(mx.array(x)))
    expect = x @ walsh_hadamard(n).numpy()
    assert np.abs(rotated - expect).max() < 1e-6 * np.abs(expect).max()
    assert np.allclose(rotated @ rotated.T, x @ x.T, rtol=1e-5, atol=1e-4)  # dot products kept


def test_fp4_indexer_stores_and_scores_rotated_fp4_values():
    rng = np.random.default_rng(4)
    keys = rows_with_edge_cases(rng, 300, 128, 32, 6.0, E2M1_TIES)[None]
    queries = mx.array(rng.standard_normal((1, 2, 5, 128)).astype(np.float32))
    codec = IndexCodec("fp4", 128, mx.float32)
    parts = codec.encode(mx.array(keys))
    expect_keys = fp4_simulated(as_torch(hadamard_rotate(mx.array(keys)))).numpy()
    assert np.array_equal(np.array(codec.decode(parts)), expect_keys)
    q = codec.queries(queries)
    expect_q = fp4_simulated(as_torch(hadamard_rotate(queries))).numpy()
    assert q.dtype == mx.float32 and np.array_equal(np.array(q), expect_q)
    scores = np.array(codec.scores(q, parts))
    assert np.allclose(scores, expect_q @ expect_keys[:, None].swapaxes(-1, -2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fp8", "bf16", "float"])
def test_other_index_dtypes_keep_queries_and_keys_unrotated(kind):
    q = mx.array(np.random.default_rng(5).standard_normal((1, 2, 3, 64)).astype(np.float32))
    codec = IndexCodec(kind, 64, mx.float32)
    assert np.array_equal(np.array(codec.queries(q)), np.array(q))


def test_fp4_indexer_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="index_head_dim must be a power of two, got 96"):
        IndexCodec("fp4", 96, mx.float32)
    IndexCodec("fp8", 96, mx.float32)  # no rotation, no such limit


def test_cache_saved_before_keys_were_rotated_is_rejected():
    model = Model(ModelArgs.from_dict({**tiny_config("flash"), "vocab_size": 512}))
    arrays, meta = model.make_cache().to_state()
    assert meta["index_rotation"] == "hadamard"
    unrotated = {k: v for k, v in meta.items() if k != "index_rotation"}
    with pytest.raises(ValueError, match="rotated by 'none'.*rotates them by 'hadamard'"):
        model.make_cache().load_state(dict(arrays), unrotated)
    arrays, meta = model.make_cache("bf16", "bf16").to_state()
    model.make_cache("bf16", "bf16").load_state(dict(arrays), {k: v for k, v in meta.items() if k != "index_rotation"})
