"""Training pieces: the numpy head's gradients, the indexer's objective."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_dsv4.train.trainer import Recorder, head_cross_entropy, indexer_kl, init_model, trained_config, trunk


def test_head_cross_entropy_value_and_gradients_match_mlx():
    rng = np.random.default_rng(0)
    feats = mx.array(rng.normal(size=(5, 8)).astype(np.float32))
    weight = mx.array(rng.normal(size=(50, 8)).astype(np.float32))
    targets = mx.array(rng.integers(0, 50, 5).astype(np.int32))

    def ours(f, w):
        return 3.0 * head_cross_entropy(f, w, targets)

    def reference(f, w):
        return 3.0 * nn.losses.cross_entropy(f @ w.T, targets).mean()

    (v1, g1), (v2, g2) = (mx.value_and_grad(fn, argnums=(0, 1))(feats, weight) for fn in (ours, reference))
    assert np.allclose(v1.item(), v2.item(), rtol=1e-5)
    for a, b in zip(g1, g2):
        assert np.allclose(np.array(a), np.array(b), atol=1e-5)


def test_indexer_objective_trains_the_indexer_not_the_attention_queries():
    cfg = trained_config()
    cfg["vocab_size"] = 512
    model, _ = init_model(cfg, seed=0)
    recorder = Recorder(model)
    tokens = mx.array(np.random.default_rng(0).integers(0, 512, (1, 96)).astype(np.int32))
    positions = np.arange(8, 96, 8, dtype=np.int32)

    def loss(params):
        model.update(params)
        _, _, cache = trunk(model, tokens)
        return indexer_kl(model, recorder, cache, positions)

    value, grads = mx.value_and_grad(loss)(model.trainable_parameters())
    grads = dict(tree_flatten(grads))
    csa = next(i for i, r in enumerate(cfg["compress_ratios"]) if r == 4)
    assert value.item() > 0
    for name in ("indexer.wq_b.weight", "indexer.weights_proj.weight", "indexer.compressor.wkv.weight"):
        assert mx.abs(grads[f"layers.{csa}.attn.{name}"]).max().item() > 0, name
    # the target is the main attention's distribution, held fixed
    assert mx.abs(grads[f"layers.{csa}.attn.wq_b.weight"]).max().item() == 0


def test_gradients_pass_learned_routing_and_the_indexer_top_k():
    cfg = trained_config()
    cfg["vocab_size"] = 512
    model, _ = init_model(cfg, seed=0)
    tokens = mx.array(np.random.default_rng(1).integers(0, 512, (1, 200)).astype(np.int32))

    def loss(params):
        model.update(params)
        feats, _, _ = trunk(model, tokens)
        return (feats[0, -8:] ** 2).mean()

    _, grads = mx.value_and_grad(loss)(model.trainable_parameters())
    grads = dict(tree_flatten(grads))
    learned = next(i for i in range(cfg["num_hidden_layers"]) if i >= cfg["num_hash_layers"])
    csa = next(i for i, r in enumerate(cfg["compress_ratios"]) if r == 4)
    assert mx.abs(grads[f"layers.{learned}.ffn.gate.weight"]).max().item() > 0
    # the CSA layer's picked entries (200 tokens: 50 entries, top 16) carry gradient to its compressor
    assert mx.abs(grads[f"layers.{csa}.attn.compressor.wkv.weight"]).max().item() > 0
