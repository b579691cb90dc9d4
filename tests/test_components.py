"""Each V4 component against its counterpart in the transformers reference."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_dsv4
from conftest import PARITY_VOCAB
from mlx_dsv4.attention import Indexer
from mlx_dsv4.cache import CompressorState
from mlx_dsv4.hc import hc_split
from mlx_dsv4.kvcodec import KVCodec
from mlx_dsv4.rope import Rope, inv_freq_for
from parity import reference_model


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    path = tiny_dirs["flash"]
    return mlx_dsv4.load_model(path), reference_model(str(path))


def close(a, b, tol=1e-5):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def test_rope_frequencies_match_reference(pair):
    ours, ref = pair
    close(inv_freq_for(ours.args, compressed=False), ref.model.rotary_emb.main_inv_freq, 1e-6)
    close(inv_freq_for(ours.args, compressed=True), ref.model.rotary_emb.compress_inv_freq, 1e-6)
    # YaRN really interpolates some frequencies for compressed layers
    assert not np.allclose(np.array(inv_freq_for(ours.args, True)), np.array(inv_freq_for(ours.args, False)))


def test_interleaved_partial_rope_and_inverse(pair):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

    ours, ref = pair
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 9, ours.args.head_dim)).astype(np.float32)
    pos = np.arange(100, 109)
    rope = Rope(inv_freq_for(ours.args, True))
    tcos, tsin = ref.model.rotary_emb(torch.zeros(1), torch.tensor(pos)[None], layer_type="compress")
    expect = apply_rotary_pos_emb(torch.tensor(x), tcos, tsin).numpy()
    got = rope(mx.array(x), offset=100)
    close(got, expect)
    rd = ours.args.qk_rope_head_dim
    assert np.array_equal(np.array(got)[..., :-rd], x[..., :-rd])  # leading dims untouched
    close(rope(got, offset=100, inverse=True), x)
    # strided positions (compressed entries sit at w * ratio)
    tcos, tsin = ref.model.rotary_emb(torch.zeros(1), torch.tensor(pos * 4)[None], layer_type="compress")
    close(rope(mx.array(x), offset=100, stride=4), apply_rotary_pos_emb(torch.tensor(x), tcos, tsin).numpy())


def test_mhc_split_matches_reference(pair):
    ours, ref = pair
    a = ours.args
    rng = np.random.default_rng(1)
    streams = rng.normal(size=(2, 5, a.hc_mult, a.hidden_size)).astype(np.float32)
    blk = ours.layers[3]
    x, post, comb = hc_split(
        mx.array(streams), blk.hc_attn_fn, blk.hc_attn_base, blk.hc_attn_scale,
        iters=a.hc_sinkhorn_iters, eps=a.hc_eps, norm_eps=a.rms_norm_eps,
    )
    with torch.no_grad():
        rpost, rcomb, rx = ref.model.layers[3].attn_hc(torch.tensor(streams))
    close(x, rx.numpy())
    close(post, rpost.numpy())
    close(comb, rcomb.numpy())
    c = np.array(comb)
    assert np.allclose(c.sum(-1), 1, atol=1e-3) and np.allclose(c.sum(-2), 1, atol=1e-3)


@pytest.mark.parametrize("layer", [0, 4], ids=["hash-routed", "learned-routing"])
def test_moe_matches_reference(pair, layer):
    ours, ref = pair
    rng = np.random.default_rng(layer)
    x = rng.normal(size=(2, 70, ours.args.hidden_size)).astype(np.float32)  # >= 64 rows: sorted expert path
    tokens = rng.integers(0, PARITY_VOCAB, (2, 70))
    got = ours.layers[layer].ffn(mx.array(x), mx.array(tokens))
    with torch.no_grad():
        expect = ref.model.layers[layer].mlp(torch.tensor(x), input_ids=torch.tensor(tokens))
    close(got, expect.numpy())
    got_small = ours.layers[layer].ffn(mx.array(x[:, :3]), mx.array(tokens[:, :3]))  # unsorted path
    close(got_small, expect.numpy()[:, :3])


def test_grouped_output_projection_matches_reference(pair):
    ours, ref = pair
    a = ours.args
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 4, a.o_groups, a.num_attention_heads * a.head_dim // a.o_groups)).astype(np.float32)
    got = ours.layers[2].attn.wo_a(mx.array(x)[..., None, :], mx.arange(a.o_groups)).squeeze(-2)
    with torch.no_grad():
        expect = ref.model.layers[2].self_attn.o_a_proj(torch.tensor(x))
    close(got, expect.numpy())


def test_indexer_selects_the_same_entries_as_reference(pair):
    ours, ref = pair
    tokens = np.random.default_rng(5).integers(0, PARITY_VOCAB, (1, 640))
    ref_sel, our_sel, handles = [], [], []
    for layer in ref.model.layers:
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            handles.append(comp.indexer.register_forward_hook(lambda m, i, o: ref_sel.append(o.numpy()) and None))
    with torch.no_grad():
        ref(torch.tensor(tokens), use_cache=False)
    for h in handles:
        h.remove()
    original = Indexer.select

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        our_sel.append((np.array(out[0]), np.array(out[1])))
        return out

    Indexer.select = recording
    try:
        ours(mx.array(tokens), cache=ours.make_cache("float", "float"))
    finally:
        Indexer.select = original
    n_csa = ours.args.compress_ratios.count(4)
    assert len(ref_sel) == n_csa
    # ours selects per query block; stitch the blocks of each layer back together
    per_layer = len(our_sel) // n_csa
    topk = ours.args.index_topk
    dropped = 0
    for layer, r in enumerate(ref_sel):
        blocks = our_sel[layer * per_layer : (layer + 1) * per_layer]
        t = 0
        for idx, valid in blocks:
            for row in range(idx.shape[1]):
                expect = set(r[0, t][r[0, t] >= 0].tolist())
                assert set(idx[0, row][valid[0, row]].tolist()) == expect, f"layer {layer} position {t}"
                dropped += max(0, (t + 1) // 4 - topk)
                t += 1
        assert t == tokens.shape[1]
    assert dropped > 0


def test_compressor_streaming_equals_one_shot(pair):
    ours, _ = pair
    attn = ours.layers[2].attn  # ratio 4: exercises the overlap half across calls
    a = ours.args
    x = mx.array(np.random.default_rng(3).normal(size=(1, 37, a.hidden_size)).astype(np.float32))
    codec = KVCodec("float", a.head_dim, a.qk_rope_head_dim, mx.float32)
    one = CompressorState(codec)
    attn.compressor(x, one, attn.rope)
    streamed = CompressorState(codec)
    for t in range(37):
        attn.compressor(x[:, t : t + 1], streamed, attn.rope)
    assert one.n_entries == streamed.n_entries == 9
    close(streamed.entries(), one.entries())
    assert streamed.pending_kv.shape[1] == 1  # only the open window is kept


def test_cache_keeps_only_the_window_and_entries(pair):
    ours, _ = pair
    cache = ours.make_cache()
    tokens = mx.array(np.random.default_rng(4).integers(0, PARITY_VOCAB, (1, 300)))
    ours(tokens[:, :200], cache=cache)
    ours(tokens[:, 200:], cache=cache)
    assert cache.offset == 300
    for layer, r in zip(cache.layers, ours.args.compress_ratios):
        assert all(p.shape[1] == ours.args.sliding_window for p in layer._ring)  # a ring, not a growing array
        if r:
            assert layer.compressor.n_entries == 300 // r
            assert layer.compressor.pending_kv.shape[1] == 300 % r
    assert cache.nbytes > 0


def test_decoded_window_is_the_decoded_ring_through_writes_wraps_and_restores(pair):
    """The window's rows are decoded once, when written: at every point (a prefill, single steps
    across the ring's wrap, a chunk, a restored snapshot) that copy equals decoding the stored ring."""
    ours, _ = pair
    tokens = np.random.default_rng(5).integers(0, PARITY_VOCAB, (1, 330)).tolist()[0]
    cache = ours.make_cache("fp8", "fp4")

    def check(c):
        for layer in c.layers:
            np.testing.assert_array_equal(np.array(layer._window.astype(mx.float32)),
                                          np.array(layer.kv_codec.decode(layer._ring).astype(mx.float32)))

    ours(mx.array([tokens[:100]]), cache=cache)
    check(cache)
    for t in tokens[100:140]:  # single steps across slot 127 -> 0
        ours(mx.array([[t]]), cache=cache)
    check(cache)
    ours(mx.array([tokens[140:300]]), cache=cache)  # a chunk longer than the window
    check(cache)
    restored = ours.make_cache("fp8", "fp4")
    restored.load_state(*cache.to_state())
    check(restored)
    after = [ours(mx.array([tokens[300:]]), cache=c) for c in (cache, restored)]
    np.testing.assert_array_equal(np.array(after[0]), np.array(after[1]))


def test_no_cache_equals_fresh_cache(pair):
    ours, _ = pair
    tokens = mx.array(np.random.default_rng(6).integers(0, PARITY_VOCAB, (1, 150)))
    close(ours(tokens), ours(tokens, cache=ours.make_cache()), 0)  # the default cache is FP8
    close(ours(tokens, last_only=True), np.array(ours(tokens))[:, -1:], 0)


def test_cache_state_round_trip_continues_identically(pair):
    ours, _ = pair
    tokens = mx.array(np.random.default_rng(8).integers(0, PARITY_VOCAB, (1, 270)))
    cache = ours.make_cache()
    ours(tokens[:, :261], cache=cache)
    arrays, meta = cache.to_state()
    mx.eval(arrays)
    restored = ours.make_cache()
    restored.load_state(dict(arrays), dict(meta))
    assert restored.offset == 261 and 0 < restored.nbytes <= cache.nbytes  # restored without spare capacity
    close(ours(tokens[:, 261:], cache=restored), ours(tokens[:, 261:], cache=cache), 0)
    other = mlx_dsv4.model.Model(mlx_dsv4.ModelArgs.from_dict({**mlx_dsv4.tiny.tiny_config("pro"), "vocab_size": 512}))
    with pytest.raises(ValueError, match="layer schedule"):
        other.make_cache().load_state(dict(arrays), dict(meta))


def test_cache_snapshot_is_not_changed_by_later_decoding(pair):
    ours, _ = pair
    tokens = mx.array(np.random.default_rng(9).integers(0, PARITY_VOCAB, (1, 140)))
    cache = ours.make_cache()
    ours(tokens[:, :130], cache=cache)
    arrays, meta = cache.to_state()
    as_np = lambda v: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
    before = {k: as_np(v) for k, v in arrays.items()}
    ours(tokens[:, 130:], cache=cache)  # writes into the ring and the entry buffers
    for k, v in arrays.items():
        assert np.array_equal(as_np(v), before[k]), k


def test_naive_baseline_cache_computes_the_same_logits(pair):
    ours, _ = pair
    tokens = mx.array(np.random.default_rng(10).integers(0, PARITY_VOCAB, (1, 300)))
    fast, naive = ours.make_cache("float", "float"), ours.make_cache("float", "float", naive=True)
    a = [ours(tokens[:, :290], cache=fast)] + [ours(tokens[:, t : t + 1], cache=fast) for t in range(290, 300)]
    b = [ours(tokens[:, :290], cache=naive)] + [ours(tokens[:, t : t + 1], cache=naive) for t in range(290, 300)]
    close(mx.concatenate(a, axis=1), mx.concatenate(b, axis=1), 1e-5)
    assert naive.layers[0]._ring[0].shape[1] == 300  # every raw row kept
    assert naive.nbytes > fast.nbytes


@pytest.mark.parametrize("n_tokens", [1, 40], ids=["few-experts", "all-experts"])
def test_gathered_linear_half_precision_matches_float32(n_tokens):
    from mlx_dsv4.layers import GatheredLinear

    rng = np.random.default_rng(12)
    layer = GatheredLinear(16, 8, 6, bias=False)
    layer.weight = mx.array(rng.normal(size=(6, 8, 16)).astype(np.float32)).astype(mx.bfloat16)
    x = mx.array(rng.normal(size=(n_tokens, 1, 1, 16)).astype(np.float32)).astype(mx.bfloat16)
    idx = mx.array(rng.integers(0, 6, (n_tokens, 2)))
    got = layer(x, idx)
    w = np.array(layer.weight.astype(mx.float32))
    xs = np.array(x.astype(mx.float32))
    expect = np.einsum("nd,nkod->nko", xs[:, 0, 0], w[np.array(idx)])[:, :, None, :]
    assert got.dtype == mx.bfloat16 and got.shape == (n_tokens, 2, 1, 8)
    close(got.astype(mx.float32), expect, 1e-2)


@pytest.mark.parametrize("kind", ["fp4", "fp8", "bf16"])
def test_index_scores_on_stored_keys_equal_decoded_keys(kind):
    from mlx_dsv4.kvcodec import IndexCodec

    rng = np.random.default_rng(13)
    codec = IndexCodec(kind, 64, mx.float32)
    parts = codec.encode(mx.array(rng.normal(size=(1, 50, 64)).astype(np.float32)))
    q = mx.array(rng.normal(size=(1, 3, 5, 64)).astype(np.float32))
    expect = np.array(q) @ np.array(codec.decode(parts))[:, None].swapaxes(-1, -2)
    close(codec.scores(q, parts), expect, 1e-5)
