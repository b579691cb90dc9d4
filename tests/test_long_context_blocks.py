"""The per-chunk work that would grow with the context is done in bounded blocks, with the same
results as done whole."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_dsv4
from mlx_dsv4 import attention
from mlx_dsv4.kvcodec import KVCodec, _fp8_decode_f32


def test_fp8_rows_decode_to_bfloat16_as_through_float32():
    """Every E4M3 code under every scale exponent: the direct bfloat16 decoding equals the float32
    one rounded to bfloat16 (infinities and underflow included)."""
    codes = mx.array(np.tile(np.arange(256, dtype=np.uint8), 255 * 64 // 256 + 1)[: 255 * 64].reshape(255, 64))
    codes = mx.concatenate([codes, codes[:, ::-1]], axis=-1)  # [255, 128]: two scale groups per row
    exps = mx.array(np.stack([np.arange(255), np.arange(255)[::-1]], axis=-1).astype(np.uint8))
    codec = KVCodec("fp8", 128 + 16, 16, mx.bfloat16)
    rope = mx.zeros((255, 16), dtype=mx.bfloat16)
    got = codec.decode((codes, exps, rope))[:, :128]
    expected = _fp8_decode_f32(codes, exps).astype(mx.bfloat16)
    both_nan = mx.isnan(got) & mx.isnan(expected)
    assert mx.all(both_nan | (got == expected)).item()
    assert mx.array_equal(mx.isnan(got), mx.isnan(expected)).item()


def _logits(model, tokens, query_block):
    cache = model.make_cache()
    cache.query_block = query_block
    return np.array(model(tokens, cache).astype(mx.float32))


@pytest.fixture(scope="module")
def flash(tiny_dirs):
    return mlx_dsv4.load_model(tiny_dirs["flash"])


def test_dense_layers_take_fewer_queries_at_a_time_past_the_entry_block(flash, monkeypatch):
    tokens = mx.array(np.random.default_rng(4).integers(2, 200, (1, 700)))  # 5 HCA entries by the end
    whole = _logits(flash, tokens, attention.QUERY_BLOCK)
    steps = []
    block = attention.Attention._block

    def recording(self, q, q0, q1, *args):
        if self.ratio == 128:
            steps.append(q1 - q0)
        return block(self, q, q0, q1, *args)

    monkeypatch.setattr(attention.Attention, "_block", recording)
    monkeypatch.setattr(attention, "DENSE_ENTRY_BLOCK", 2)
    blocked = _logits(flash, tokens, attention.QUERY_BLOCK)
    assert max(steps) == attention.QUERY_BLOCK * 2 // 5
    np.testing.assert_array_equal(blocked, whole)


def test_blocks_decode_their_own_picks_past_one_blocks_worth_of_entries(flash, monkeypatch):
    """Once the entries outnumber what a query block picks, each block decodes only its picks
    (no step decodes every entry); the logits stay those of decoding all entries once, up to the
    rounding of smaller query blocks (their top-k merges list the picks in another order)."""
    tokens = mx.array(np.random.default_rng(5).integers(2, 200, (1, 400)))  # 100 CSA entries
    k = flash.args.index_topk
    decoded_all = []
    entries = attention.CompressorState.entries

    def recording(self, first=0, end=None):
        if first == 0 and end is None and self.codec.__class__.__name__ == "KVCodec":
            decoded_all.append(self.n_entries)
        return entries(self, first, end)

    monkeypatch.setattr(attention.CompressorState, "entries", recording)
    whole = _logits(flash, tokens, 128)  # 128 x top-k >= 100 entries: all decoded once
    assert decoded_all
    decoded_all.clear()
    small = max(1, 100 // k - 1)  # small x top-k < 100 entries
    per_block = _logits(flash, tokens, small)
    assert all(n <= small * k for n in decoded_all)
    np.testing.assert_allclose(per_block, whole, rtol=0, atol=1e-4 * np.abs(whole).max())
