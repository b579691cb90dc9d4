"""The default cache (FP8 kv rows, rotated FP4 indexer keys and queries) against the reference
run in the precision DeepSeek-V4 was trained with (parity.reference_logits(storage="as-trained")).

Rounding to FP8 and FP4 turns float32 noise into jumps: moving the embeddings by one float32
step moves many positions' logits past TOL (test_trained_precision_amplifies_one_ulp_changes),
so two float32 implementations cannot agree position by position over a whole free-running
pass. Each layer is therefore fed the reference's input streams (teacher forcing): what each
layer stores and reads is then compared on equal inputs, layer by layer and for the logits of
the last one, with the BF16-storage bounds of test_parity.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dsv4
from conftest import PARITY_VOCAB
from mlx_dsv4 import kvcodec
from mlx_dsv4.hc import hc_head
from mlx_dsv4.streams import split_outputs
from parity import reference_layer_streams, reference_logits, reference_model
from test_parity import BF16_MEAN_KL, BF16_TOL_SHARE, SEQ, TOL, mean_kl

N_PREFILL_BEFORE_DECODE = SEQ - 64 - 5  # decoding crosses ratio-4 and ratio-128 window boundaries
PATHS = {  # name: (batch rows, chunk lengths)
    "one-shot": (slice(0, 1), [SEQ]),
    "batch-2": (slice(0, 2), [SEQ]),
    "uneven-chunks": (slice(1, 2), [77] * (SEQ // 77) + [SEQ % 77]),
    "short-chunks-after-prefill": (slice(0, 1), [SEQ - 40] + [3] * 13 + [1]),
    "prefill-then-decode": (slice(0, 1), [N_PREFILL_BEFORE_DECODE] + [1] * (SEQ - N_PREFILL_BEFORE_DECODE)),
}


def share_within_tol(ours: np.ndarray, ref: np.ndarray) -> float:
    """Share of positions [B, L] whose largest difference is within TOL of the reference's largest magnitude."""
    per_position = np.abs(ours - ref).reshape(*ref.shape[:2], -1).max(-1) / np.abs(ref).max()
    return float((per_position < TOL).mean())


def layer_by_layer(model, tokens: np.ndarray, chunks, inputs, cache) -> tuple:
    """Each layer run on the reference's input streams with `cache`: (outputs per layer, logits of the last)."""
    a = model.args
    outputs, logits, start = [[] for _ in model.layers], [], 0
    for c, n in enumerate(chunks):
        ids = mx.array(tokens[:, start : start + n])
        start += n
        for i, layer in enumerate(model.layers):
            out = layer(mx.array(inputs[i][c]), ids, cache.layers[i], cache.query_block)
            outputs[i].append(np.array(out))
        x = hc_head(out, model.hc_head_fn, model.hc_head_base, model.hc_head_scale, eps=a.hc_eps, norm_eps=a.rms_norm_eps)
        logits.append(np.array(split_outputs(model.head, model.norm(x))))
    return [np.concatenate(o, axis=1) for o in outputs], np.concatenate(logits, axis=1)


class Case:
    """A tiny model and, per path, the as-trained reference run's layer streams and logits."""

    def __init__(self, path):
        self.path = path
        self.tokens = np.random.default_rng(123).integers(0, PARITY_VOCAB, (2, SEQ))
        self.model = mlx_dsv4.load_model(path)
        self._runs = {}

    def reference(self, name):
        if name not in self._runs:
            rows, chunks = PATHS[name]
            self._runs[name] = reference_layer_streams(self.path, self.tokens[rows], chunks)
        return self._runs[name]

    def shares_and_kl(self, name, cache):
        """(share within TOL per layer, share within TOL of the logits, mean KL of the logits)."""
        rows, chunks = PATHS[name]
        inputs, ref_outputs, ref_logits = self.reference(name)
        outputs, logits = layer_by_layer(self.model, self.tokens[rows], chunks, inputs, cache)
        layers = [share_within_tol(o, np.concatenate(r, axis=1)) for o, r in zip(outputs, ref_outputs)]
        return layers, share_within_tol(logits, ref_logits), mean_kl(logits, ref_logits)


def within_bounds(layers, logits_share, kl) -> bool:
    return min(layers) >= BF16_TOL_SHARE and logits_share >= BF16_TOL_SHARE and kl < BF16_MEAN_KL


@pytest.fixture(scope="module", params=["flash", "pro"])
def case(request, tiny_dirs):
    return Case(tiny_dirs[request.param])


def test_default_cache_stores_fp8_rows_and_fp4_indexer_keys(case):
    cache = case.model.make_cache()
    assert (cache.kv_dtype, cache.index_dtype) == ("fp8", "fp4")


@pytest.mark.parametrize("name", PATHS)
def test_default_cache_matches_the_as_trained_reference(case, name):
    layers, logits_share, kl = case.shares_and_kl(name, case.model.make_cache())
    assert within_bounds(layers, logits_share, kl), (
        f"{name}: share of positions within {TOL} per layer {layers}, logits {logits_share:.3f}, mean KL {kl:.1e}")


def _rotation_off(monkeypatch):
    monkeypatch.setattr(kvcodec, "hadamard_rotate", lambda x: x)


def _queries_not_quantised(monkeypatch):
    monkeypatch.setattr(kvcodec.IndexCodec, "queries", lambda self, q: kvcodec.hadamard_rotate(q).astype(mx.float32))


def _keys_not_quantised(monkeypatch):
    keys = lambda parts: parts[0].astype(mx.float32)
    monkeypatch.setattr(kvcodec.IndexCodec, "encode", lambda self, x: (kvcodec.hadamard_rotate(x),))
    monkeypatch.setattr(kvcodec.IndexCodec, "decode", lambda self, parts: parts[0])
    monkeypatch.setattr(kvcodec.IndexCodec, "scores", lambda self, q, parts: q @ keys(parts)[:, None].swapaxes(-1, -2))


def _kv_rows_not_quantised(monkeypatch):
    monkeypatch.setattr(kvcodec.KVCodec, "encode", lambda self, x: (x,))
    monkeypatch.setattr(kvcodec.KVCodec, "decode", lambda self, parts: parts[0])


@pytest.mark.parametrize("mutation", [_rotation_off, _queries_not_quantised, _keys_not_quantised, _kv_rows_not_quantised],
                         ids=["rotation-off", "queries-not-fp4", "keys-not-fp4", "kv-rows-not-fp8"])
def test_bounds_reject_a_cache_that_skips_a_rounding_step(case, mutation, monkeypatch):
    mutation(monkeypatch)
    layers, logits_share, kl = case.shares_and_kl("one-shot", case.model.make_cache())
    assert not within_bounds(layers, logits_share, kl)


def _index_scores(path, tokens, storage):
    """Every indexer scoring of the reference run: [B, L, T] per CSA layer."""
    model = reference_model(str(path))
    scores = []
    hooks = [layer.self_attn.compressor.indexer.scorer.register_forward_hook(lambda m, a, out: scores.append(out.clone()))
             for layer in model.model.layers if hasattr(getattr(layer.self_attn.compressor, "indexer", None), "scorer")]
    try:
        reference_logits(path, tokens, chunks=[tokens.shape[1]], storage=storage)
    finally:
        for hook in hooks:
            hook.remove()
    return scores


@pytest.mark.parametrize("storage", ["float", "bf16", "as-trained"])
def test_no_exact_tie_at_the_top_k_boundary(case, storage):
    """Where a query sees more entries than index_topk, its k-th and (k+1)-th scores differ, so the
    reference's choice does not rest on how top-k breaks ties."""
    import torch

    k = case.model.args.index_topk
    scores = _index_scores(case.path, case.tokens, storage)
    assert len(scores) == case.model.args.compress_ratios.count(4)
    checked = 0
    for s in scores:
        for t in range(s.shape[1]):
            visible = (t + 1) // 4
            if visible > k:
                top = torch.sort(s[:, t, :visible], dim=-1, descending=True).values
                assert bool((top[:, k - 1] > top[:, k]).all()), f"tie at query {t}: {top[:, k - 1 : k + 1]}"
                checked += 1
    assert checked > SEQ  # both CSA layers, most queries


def test_trained_precision_amplifies_one_ulp_changes(tiny_dirs):
    """Embeddings moved by about one float32 step move float-storage logits by about as much, but
    tip FP8/FP4 roundings and the top-k choices they feed, moving many positions far past TOL:
    why the default cache is compared layer by layer."""
    path = tiny_dirs["flash"]
    tokens = mx.array(np.random.default_rng(123).integers(0, PARITY_VOCAB, (2, SEQ)))
    model, moved = mlx_dsv4.load_model(path), mlx_dsv4.load_model(path)
    w = dict(tree_flatten(moved.parameters()))["embed.weight"]
    moved.embed.weight = w * (1 + 1e-7 * mx.random.normal(w.shape, key=mx.random.key(0)))
    float_a = np.array(model(tokens, cache=model.make_cache("float", "float")))
    float_b = np.array(moved(tokens, cache=moved.make_cache("float", "float")))
    assert share_within_tol(float_b, float_a) == 1.0
    a, b = np.array(model(tokens, cache=model.make_cache())), np.array(moved(tokens, cache=moved.make_cache()))
    assert share_within_tol(b, a) < BF16_TOL_SHARE
