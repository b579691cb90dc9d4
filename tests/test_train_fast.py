"""The training path (mlx_dsv4.train.fast) computes what the cache path (Trainer(reference=True))
computes: the same loss terms, gradients, indexer top-k picks and training steps."""

import numpy as np
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train import fast
from mlx_dsv4.train.trainer import Trainer, TrainOptions, task_vocabulary, trunk

TOLERANCE = 1e-5
# The mHC parameters' gradients (and the sinks') are each one sum, over every position, of terms of
# both signs: float32 summation in another order (another CPU's BLAS kernels) moves such a sum by
# more than 1e-5 of the largest (seen: 1.25e-5 for the MTP layer's hc_head_fn on an AMD EPYC).
SUM_TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _random_batch(L: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 129280, L).astype(np.int32)
    main_pos = np.arange(L // 3, L - 1, 2, dtype=np.int32)
    mtp_pos = main_pos[main_pos < L - 2]
    index_pos = np.arange(5, L, 9, dtype=np.int32)
    return dict(tokens=mx.array(ids[None]), main_pos=mx.array(main_pos), main_targets=mx.array(ids[main_pos + 1]),
                mtp_pos=mx.array(mtp_pos), mtp_targets=mx.array(ids[mtp_pos + 2]), index_pos=index_pos)


def _clear_of_relu_kinks(trainer: Trainer, batch: dict) -> np.ndarray:
    """The batch's indexer-objective positions at which no indexer score (per head) lies within
    1e-5 of the largest of zero: there relu's derivative would flip on float32 rounding of
    either path, and the objective's gradient with it."""
    records = {}
    fast.trunk(trainer.model, batch["tokens"], records)
    keep = np.ones(len(batch["index_pos"]), bool)
    pos = mx.array(batch["index_pos"])
    for r in records.values():
        s = np.array(r["iq"][0, pos] @ r["keys"][0].astype(mx.float32).T)  # [P, H, T]
        keep &= (np.abs(s) > 1e-5 * np.abs(s).max()).all(axis=(1, 2))
    assert keep.mean() > 0.5, "too few positions clear of relu's kink to compare the indexer objective"
    return batch["index_pos"][keep]


def _losses_and_grads(trainer: Trainer, batch: dict):
    (_, parts), grads = trainer._grad(trainer._joint, batch["tokens"], batch["main_pos"], batch["main_targets"],
                                      batch["mtp_pos"], batch["mtp_targets"], batch["index_pos"])
    mx.eval(parts, grads)
    assert list(parts) == ["main", "mtp", "indexer_kl"]  # the guidance objectives are off by default
    return [float(parts[k]) for k in ("main", "mtp", "indexer_kl")], dict(tree_flatten(grads))


def _reference_picks(trainer: Trainer, tokens: mx.array) -> dict:
    """Per CSA layer, the cache path's top-k picks as a boolean [L, T] (valid picks only)."""
    model = trainer.model
    _, _, cache = trunk(model, tokens)
    records = dict(trainer.recorder.records)
    trainer.recorder.records.clear()
    picks = {}
    L = tokens.shape[1]
    for i, rec in records.items():
        attn, state = model.layers[i].attn, cache.layers[i].indexer
        T = state.n_entries
        iq = rec["iq"].transpose(0, 2, 1, 3)
        chosen = np.zeros((L, T), bool)
        for q0 in range(0, L, 128):
            q1 = min(L, q0 + 128)
            visible = ((mx.arange(q0, q1) + 1) // 4)[:, None]
            indices, valid = attn.indexer.select(iq[:, :, q0:q1], rec["iw"][:, q0:q1], state, visible,
                                                 n_entries=min(T, q1 // 4), decode_keys=True)
            for row, (idx, ok) in enumerate(zip(np.array(indices[0]), np.array(valid[0]))):
                chosen[q0 + row, idx[ok]] = True
        picks[i] = chosen
    return picks


def _fast_picks(trainer: Trainer, tokens: mx.array) -> dict:
    model = trainer.model
    records = {}
    fast.trunk(model, tokens, records)
    picks = {}
    L = tokens.shape[1]
    for i, r in records.items():
        T = r["keys"].shape[1]
        visible = np.arange(T)[None, :] < ((np.arange(L) + 1) // 4)[:, None]
        scores = fast.index_scores(r["iq"], r["iw"], r["keys"])
        k = model.layers[i].attn.indexer.topk
        # The picks are defined only when the k-th and (k + 1)-th highest visible scores differ.
        ordered = -np.sort(-np.where(visible, scores[0], -np.inf), axis=-1)
        crowded = visible.sum(axis=-1) > k
        assert (ordered[crowded, k - 1] != ordered[crowded, k]).all(), "tied indexer scores at the top-k boundary"
        picks[i] = fast.top_k_mask(scores, visible, k)[0]
    return picks


@pytest.mark.parametrize("source", ["first batch", "random 701 tokens"])
def test_training_path_matches_cache_path(tokenizer, source):
    options = TrainOptions(seed=0)
    reference, trainer = Trainer(tokenizer, options, reference=True), Trainer(tokenizer, options)
    batch = trainer.batch()[0] if source == "first batch" else _random_batch(701, seed=3)
    L = batch["tokens"].shape[1]
    assert L >= 600 and L % 128
    batch["index_pos"] = _clear_of_relu_kinks(trainer, batch)

    ref_picks, fast_picks = _reference_picks(reference, batch["tokens"]), _fast_picks(trainer, batch["tokens"])
    assert ref_picks.keys() == fast_picks.keys() and ref_picks
    for i in ref_picks:
        assert ref_picks[i].sum() > 0
        np.testing.assert_array_equal(fast_picks[i], ref_picks[i], err_msg=f"layer {i} top-k picks")

    ref_losses, ref_grads = _losses_and_grads(reference, batch)
    losses, grads = _losses_and_grads(trainer, batch)
    assert min(ref_losses) > 0
    np.testing.assert_allclose(losses, ref_losses, rtol=TOLERANCE)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        scale = float(mx.abs(ref).max())
        assert scale > 0, name
        summed = ref.size <= 4 or ".hc_" in f".{name.split('.')[-1]}"
        if ".hc_" in f".{name.split('.')[-1]}":
            # An mHC scale's gradient can cancel down to a fraction of its fn's and base's (the
            # MTP head's: 5e-5 against 2e-3), which share its per-position factors; its rounding
            # is theirs, so it is measured against the largest of the three.
            group = name.rsplit("_", 1)[0] + "_"
            scale = max(float(mx.abs(g).max()) for n, g in ref_grads.items() if n.startswith(group))
        error = float(mx.abs(grads[name] - ref).max()) / scale
        assert error <= (SUM_TOLERANCE if summed else TOLERANCE), \
            f"{name}: gradient differs by {error:.2e} of its largest value"


def test_train_step_losses_match_cache_path(tokenizer):
    options = TrainOptions(seed=0)
    reference, trainer = Trainer(tokenizer, options, reference=True), Trainer(tokenizer, options)
    for _ in range(3):
        expected, got = reference.train_step(), trainer.train_step()
        assert got["tokens"] == expected["tokens"]
        for key in ("loss", "main", "mtp", "indexer_kl"):
            assert got[key] == pytest.approx(expected[key], rel=TOLERANCE, abs=2e-5), (got["step"], key)


def _parts_and_grads(trainer: Trainer, batch: dict, vocab):
    keys = ("tokens", "main_pos", "main_targets", "mtp_pos", "mtp_targets", "index_pos", "copy_queries", "copy_masks",
            "value_pos", "entry_query", "key_pos", "entry_keys", "arguments")
    (_, parts), grads = trainer._grad(trainer._joint, *[batch[k] for k in keys], vocab)
    mx.eval(parts, grads)
    return {k: float(v) for k, v in parts.items()}, dict(tree_flatten(grads))


def test_sampled_head_is_the_softmax_over_the_sequence_and_the_drawn_rows(tokenizer):
    options = TrainOptions(seed=5, head_sample=300, tie_head=True, guide_weight=1, copy_output_weight=1,
                           copy_value_weight=1, argument_weight=2, mix={"session": 1.0, "copy": 1.0})
    trainer = Trainer(tokenizer, options)
    batch, kinds = trainer.batch()
    vocab, ids = batch["vocab"], np.array(batch["tokens"][0])
    tasks = task_vocabulary(tokenizer, options)
    assert "session" in kinds and (np.diff(vocab) > 0).all()
    assert np.isin(ids, vocab).all() and np.isin(tasks, vocab).all()
    assert len(np.setdiff1d(tasks, ids)) > 100  # tokens of other questions: the targets' likely rivals
    assert 250 < len(np.setdiff1d(vocab, np.union1d(ids, tasks))) <= 300  # the drawn ones, mostly beyond the tasks'
    assert not np.array_equal(trainer.batch()[0]["vocab"], vocab)  # drawn anew each step

    sampled, grads = _parts_and_grads(trainer, batch, vocab)
    full, _ = _parts_and_grads(trainer, batch, None)
    assert sampled.keys() == full.keys() >= {"main", "mtp", "copy_output", "copy_value"}
    for name in ("main", "mtp", "copy_output", "copy_value"):
        assert 0 < sampled[name] < full[name], name  # the same targets against fewer rivals

    feats, _ = fast.trunk(trainer.model, batch["tokens"], {})
    logits = np.array(feats[0, batch["main_pos"]]) @ np.array(trainer._head(trainer.model)).T
    kept = logits[:, vocab]
    kept = kept - kept.max(axis=1, keepdims=True)
    log_p = kept - np.log(np.exp(kept).sum(axis=1, keepdims=True))
    rows = np.searchsorted(vocab, np.array(batch["main_targets"]))
    assert sampled["main"] == pytest.approx(-log_p[np.arange(len(rows)), rows].mean(), rel=1e-5)

    moved = np.abs(np.array(grads["model.embed.weight"])).sum(axis=1) > 0
    assert moved[vocab].mean() > 0.9 and not moved[np.setdiff1d(np.arange(len(moved)), vocab)].any()


def test_cache_path_refuses_a_sampled_head(tokenizer):
    with pytest.raises(ValueError, match="head_sample"):
        Trainer(tokenizer, TrainOptions(head_sample=8), reference=True)


def _vjp_pair(fn, reference, primals, cotangent):
    out, grads = mx.vjp(fn, primals, [cotangent])
    ref_out, ref_grads = mx.vjp(reference, primals, [cotangent])
    return (out[0], ref_out[0]), list(zip(grads, ref_grads))


def test_numpy_kernels_match_mlx_forward_and_backward():
    rng = np.random.default_rng(5)
    x = mx.array(rng.standard_normal((2, 7, 12)).astype(np.float32))
    w = mx.array(rng.standard_normal((5, 12)).astype(np.float32))
    outs, grads = _vjp_pair(lambda x, w: fast.linear(x, w), lambda x, w: x @ w.T, [x, w],
                            mx.array(rng.standard_normal((2, 7, 5)).astype(np.float32)))
    for got, want in [outs, *grads]:
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)

    experts = mx.array(rng.standard_normal((4, 6, 12)).astype(np.float32))
    indices = mx.array(np.array([0, 0, 2, 2, 2, 3, 3], np.uint32))  # expert 1 has no rows
    rows = mx.array(rng.standard_normal((7, 1, 12)).astype(np.float32))  # as RoutedExperts sorts them
    outs, grads = _vjp_pair(lambda r, e: fast.sorted_expert_linear(r, e, indices),
                            lambda r, e: mx.gather_mm(r, e.swapaxes(-1, -2), rhs_indices=indices,
                                                      sorted_indices=True), [rows, experts],
                            mx.array(rng.standard_normal((7, 1, 6)).astype(np.float32)))
    for got, want in [outs, *grads]:
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    assert not np.array(grads[1][0])[1].any()  # no gradient for the expert without rows
    with pytest.raises(ValueError, match="sorted"):
        fast.sorted_expert_linear(rows, experts, indices[::-1])

    logits = mx.array(rng.standard_normal((3, 4, 9)).astype(np.float32))
    mask = mx.array(rng.random((3, 1, 9)) < 0.6) | (mx.arange(9) == 8)  # the last column: a sink
    outs, grads = _vjp_pair(lambda z: fast.masked_softmax(z, mask),
                            lambda z: mx.softmax(mx.where(mask, z, -mx.inf), axis=-1, precise=True), [logits],
                            mx.array(rng.standard_normal((3, 4, 9)).astype(np.float32)))
    for got, want in [outs, *grads]:
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    assert not np.array(outs[0])[np.broadcast_to(~np.array(mask), (3, 4, 9))].any()


def test_numpy_products_switch_every_linear_layer_and_back(tokenizer):
    trainer = Trainer(tokenizer, TrainOptions(seed=0))
    classes = {type(m).__name__ for _, m in trainer._joint.named_modules()}
    assert {"NumpyLinear", "NumpyGroupedLinear", "NumpyGatheredLinear"} <= classes
    assert not {"Linear", "GroupedLinear", "GatheredLinear"} & classes
    tokens = trainer.batch()[0]["tokens"][:, :300]
    numpy_out = trainer.model(tokens)
    switched = fast.numpy_products(trainer._joint, enabled=False)
    assert switched > 20
    assert not any(type(m).__name__.startswith("Numpy") for _, m in trainer._joint.named_modules())
    np.testing.assert_allclose(np.array(trainer.model(tokens)), np.array(numpy_out), rtol=1e-4, atol=1e-4)
    assert fast.numpy_products(trainer._joint) == switched
    layer = next(m for _, m in trainer.model.named_modules()
                 if type(m).__name__ == "NumpyLinear" and m.weight.shape[1] == 64)
    half = mx.array(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)).astype(mx.bfloat16)
    want = half @ layer.weight.T  # numpy has no bfloat16: such inputs stay in MLX
    assert layer(half).dtype == want.dtype and mx.array_equal(layer(half), want)


def test_train_step_ops_benchmark_times_both_sides(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step", path)
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    train_step.compare_ops(repeat=1)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 5 and all(float(r[-3]) > 0 and float(r[-2]) > 0 for r in rows)
    assert [r[0] for r in rows] == ["product"] * 3 + ["exp", "softmax"]
