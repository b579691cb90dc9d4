"""KV-cache size: prediction vs the real cache, the V4-Flash 1M-token budget, and FP8 accuracy."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_dsv4
from mlx_dsv4.convert.presets import PRESETS
from mlx_dsv4.memory import kv_bytes
from mlx_dsv4.model import Model
from mlx_dsv4.tiny import tiny_config

MILLION = 1_048_576


def test_v4_flash_at_one_million_tokens():
    fp8 = kv_bytes(PRESETS["flash"], MILLION, "fp8", "fp4")
    bf16 = kv_bytes(PRESETS["flash"], MILLION, "bf16", "bf16")
    assert fp8 <= 3.8e9
    assert 7.0e9 <= bf16 <= 7.4e9
    print(f"V4-Flash, 1M tokens: fp8 {fp8 / 1e9:.3f} GB, bf16 {bf16 / 1e9:.3f} GB")


@pytest.fixture(scope="module")
def flash_cache_model():
    """A tiny model whose cache has V4-Flash's head dims, layer schedule and window."""
    flash = PRESETS["flash"]
    cfg = tiny_config(
        "flash",
        compress_ratios=flash["compress_ratios"], head_dim=flash["head_dim"], qk_rope_head_dim=64,
        index_head_dim=flash["index_head_dim"], sliding_window=flash["sliding_window"],
        num_attention_heads=2, o_groups=1, o_lora_rank=8, q_lora_rank=16, index_n_heads=2,
        n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, vocab_size=256, hc_mult=2,
    )
    args = mlx_dsv4.ModelArgs.from_dict(cfg)
    model = Model(args)
    from mlx.utils import tree_flatten

    model.load_weights([
        (k, v.astype(mx.bfloat16) if "hc_" not in k and mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in tree_flatten(model.parameters())
    ])
    return model


@pytest.mark.parametrize("kv_dtype, index_dtype", [("fp8", "fp4"), ("bf16", "fp8")])
def test_prediction_matches_measured_cache(flash_cache_model, kv_dtype, index_dtype):
    model = flash_cache_model
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (1, 600)))
    cache = model.make_cache(kv_dtype, index_dtype)
    model(tokens[:, :300], cache=cache)
    model(tokens[:, 300:], cache=cache)
    for _ in range(3):  # decode steps leave windows open
        model(tokens[:, :1], cache=cache)
    mx.eval(cache.state())
    measured = cache.nbytes
    predicted = kv_bytes(model.args, cache.offset, kv_dtype, index_dtype, dtype=model.dtype)
    print(f"{kv_dtype}/{index_dtype}: measured {measured} bytes, predicted {predicted} bytes at {cache.offset} tokens")
    assert abs(measured - predicted) <= 0.01 * predicted


def test_fp8_cache_accuracy_bound(tiny_dirs):
    """FP8 kv + FP4 indexer keys vs BF16 storage on the tiny parity models, over 2 x 640 positions."""
    from conftest import PARITY_VOCAB

    model = mlx_dsv4.load_model(tiny_dirs["flash"])
    tokens = mx.array(np.random.default_rng(11).integers(0, PARITY_VOCAB, (2, 640)))
    base = np.array(model(tokens, cache=model.make_cache("bf16", "bf16")), dtype=np.float64)
    fp8 = np.array(model(tokens, cache=model.make_cache("fp8", "fp4")), dtype=np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(base), log_softmax(fp8)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    max_rel = np.abs(fp8 - base).max() / np.abs(base).max()
    mean_rel = np.abs(fp8 - base).mean() / np.abs(base).mean()
    agree = (fp8.argmax(-1) == base.argmax(-1)).mean()
    print(f"FP8 vs BF16 cache over {kl.size} positions: max rel {max_rel:.3f}, mean rel {mean_rel:.4f}, "
          f"KL mean {kl.mean():.5f} max {kl.max():.4f}, argmax agreement {agree:.3f}")
    assert kl.size >= 1000
    # Stated bound (random tiny weights amplify rounding through discrete top-k/routing flips)
    assert kl.mean() < 0.01 and mean_rel < 0.06 and agree > 0.9
    assert max_rel < 1.0
