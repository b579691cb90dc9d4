"""The indexer's top-k, taken over entry blocks with a running merge, picks what one top-k over
all entries picks."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.attention import INDEX_ENTRY_BLOCK, Indexer, blocked_top_k
from mlx_dsv4.cache import CompressorState
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.kvcodec import IndexCodec
from mlx_dsv4.tiny import tiny_config


def _sets(indices: np.ndarray) -> list:
    flat = indices.reshape(-1, indices.shape[-1])
    return [frozenset(row.tolist()) for row in flat]


def _expected_top(scores: np.ndarray, k: int) -> list:
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    return _sets(order)


@pytest.mark.parametrize("n_entries, k, block", [
    (20000, 512, 4096),  # many entries, several blocks larger than k
    (20000, 512, 300),  # blocks smaller than k
    (5000, 700, 64),  # k much larger than a block
    (1000, 999, 128),  # nearly every entry kept
    (1000, 1, 97),  # k of one, ragged last block
    (300, 512, 64),  # fewer entries than k: all of them, each once
    (300, 16, 300),  # one block: the single top-k
])
def test_blocked_top_k_picks_the_same_set_as_one_top_k(n_entries, k, block):
    rng = np.random.default_rng(n_entries + k + block)
    scores = rng.normal(size=(2, 3, n_entries)).astype(np.float32)
    calls = []

    def entry_scores(e0, e1):
        calls.append((e0, e1))
        return mx.array(scores[..., e0:e1])

    got = np.array(blocked_top_k(entry_scores, n_entries, k, block))
    assert got.shape == (2, 3, min(k, n_entries))
    assert _sets(got) == _expected_top(scores, min(k, n_entries))
    assert all(e1 - e0 <= block for e0, e1 in calls)
    assert sorted(calls) == calls and calls[0][0] == 0 and calls[-1][1] == n_entries


def test_blocked_top_k_keeps_every_finite_score_over_masked_ones():
    """Rows that see fewer entries than k keep all the entries they see (the rest are -inf)."""
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(4, 1000)).astype(np.float32)
    visible = np.array([3, 40, 600, 1000])[:, None]
    scores = np.where(np.arange(1000) < visible, scores, -np.inf).astype(np.float32)
    got = np.array(blocked_top_k(lambda e0, e1: mx.array(scores[:, e0:e1]), 1000, 50, 32))
    for row, row_scores, v in zip(got, scores, visible[:, 0]):
        assert len(set(row.tolist())) == 50
        seen = {int(i) for i in row if i < v}
        assert seen == set(np.argsort(-row_scores, kind="stable")[: min(50, v)].tolist())


@pytest.mark.parametrize("kind, use_decoded_keys", [("float", True), ("float", False), ("fp8", False),
                                                    ("bf16", True)])
def test_indexer_select_is_the_same_for_any_entry_block(kind, use_decoded_keys):
    args = ModelArgs.from_dict(tiny_config())
    mx.random.seed(3)
    indexer = Indexer(args)
    H, d, k = args.index_n_heads, args.index_head_dim, args.index_topk
    rng = np.random.default_rng(11)
    keys = CompressorState(IndexCodec(kind, d, mx.float32))
    keys.append(mx.array(rng.normal(size=(1, 237, d)).astype(np.float32)))
    Lq = 128  # a full query block: entries are scored entry_block at a time
    q = mx.array(rng.normal(size=(1, H, Lq, d)).astype(np.float32))
    w = mx.array(rng.normal(size=(1, Lq, H)).astype(np.float32))
    visible = mx.array(np.linspace(5, 237, Lq).astype(np.int32))[:, None]
    keys_t = mx.contiguous(keys.entries().astype(mx.float32).swapaxes(-1, -2)) if use_decoded_keys else None

    def picked(block):
        indexer.entry_block = block
        indices, valid = indexer.select(q, w, keys, visible, keys_t)
        indices, valid = np.array(indices), np.array(valid)
        return [frozenset(i[v].tolist()) for i, v in zip(indices[0], valid[0])]

    whole = picked(INDEX_ENTRY_BLOCK)
    assert [len(s) for s in whole] == [min(k, int(v)) for v in np.array(visible)[:, 0]]
    for block in (5, k, 50):
        assert picked(block) == whole


def test_prefill_logits_do_not_depend_on_the_entry_block(tiny_dirs):
    """A prompt whose CSA layers hold many more entries than top-k gives the same logits when the
    indexer scores them a few at a time (picks merged in another order, so equal to rounding)."""
    import mlx_dsv4

    model = mlx_dsv4.load_model(tiny_dirs["flash"])
    indexers = [layer.attn.indexer for layer in model.layers if hasattr(layer.attn, "indexer")]
    assert indexers
    tokens = mx.array(np.random.default_rng(2).integers(2, 200, (1, 300)))

    def logits(block):
        for indexer in indexers:
            indexer.entry_block = block
        return np.array(model(tokens, model.make_cache(kv_dtype="float", index_dtype="float")).astype(mx.float32))

    whole, blocked = logits(INDEX_ENTRY_BLOCK), logits(7)
    assert np.abs(blocked - whole).max() <= 1e-4 * max(1.0, np.abs(whole).max())


def test_fewer_queries_score_more_entries_at_a_time(monkeypatch):
    """The bound is on a block's scores (queries x entries): one decoding query scores
    128 x entry_block entries in one piece; a full query block, entry_block at a time."""
    args = ModelArgs.from_dict(tiny_config())
    indexer = Indexer(args)
    indexer.entry_block = 4
    H, d = args.index_n_heads, args.index_head_dim
    keys = CompressorState(IndexCodec("float", d, mx.float32))
    keys.append(mx.random.normal((1, 300, d)))
    spans = []
    scores = CompressorState.scores
    monkeypatch.setattr(CompressorState, "scores", lambda self, q, e0=0, e1=None: spans.append((e0, e1)) or
                        scores(self, q, e0, e1))
    for Lq in (1, 64, 128):
        spans.clear()
        indexer.select(mx.random.normal((1, H, Lq, d)), mx.random.normal((1, Lq, H)), keys,
                       mx.full((Lq, 1), 300), None)
        assert max(e1 - e0 for e0, e1 in spans) == min(300, 4 * 128 // Lq), Lq
