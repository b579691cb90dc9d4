"""The predicted peak of a prefill chunk against MLX's measured peak, at reduced widths."""

import gc

import mlx.core as mx
import numpy as np
import pytest

import mlx_dsv4
from mlx_dsv4 import attention, memory
from mlx_dsv4.tiny import tiny_config, write_tiny_checkpoint

REDUCED = dict(hidden_size=512, num_attention_heads=8, head_dim=128, qk_rope_head_dim=64, q_lora_rank=256,
               o_groups=2, o_lora_rank=256, index_n_heads=16, index_head_dim=64, index_topk=128,
               sliding_window=128, moe_intermediate_size=256, compress_ratios=[4, 128], n_routed_experts=4,
               num_experts_per_tok=2, vocab_size=1024, num_hash_layers=0)


def test_block_sizes_match_the_attention():
    assert memory.QUERY_BLOCK == attention.QUERY_BLOCK
    assert memory.INDEX_ENTRY_BLOCK == attention.INDEX_ENTRY_BLOCK


def test_predicted_chunk_peak_within_15_percent_of_measured(tmp_path):
    write_tiny_checkpoint(tmp_path / "m", preset="flash", seed=0, dtype="bfloat16", mtp=False, **REDUCED)
    model = mlx_dsv4.load_model(tmp_path / "m")
    context, chunk = 6144, 2048
    tokens = mx.array(np.random.default_rng(0).integers(2, 1000, (1, context + chunk)))
    cache = model.make_cache("fp8", "fp4")
    for s in range(0, context, chunk):
        mx.eval(model(tokens[:, s : s + chunk], cache, last_only=True), cache.state())
    gc.collect()
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(model(tokens[:, context:], cache, last_only=True), cache.state())
    measured = mx.get_peak_memory() - held
    predicted = memory.prefill_peak_bytes(tiny_config(**REDUCED), chunk, context, "fp8", "fp4", "bfloat16")
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_long_context_transient_is_bounded_by_the_entry_block():
    """At V4-Flash's widths the transient grows only with the decoded entries (linear, small), not
    with an indexer score block over every entry (8.6 GB at 1M tokens)."""
    from mlx_dsv4.bench import FLASH_DIMS

    cfg = tiny_config(**FLASH_DIMS, compress_ratios=[4, 128])
    at_1m = memory.prefill_transient_bytes(cfg, 2048, 1 << 20)
    assert at_1m < 2 * memory.prefill_transient_bytes(cfg, 2048, 0)
    assert at_1m < 2 << 30
    one_score_block_over_all = 64 * 128 * (1 << 18) * 4
    assert at_1m < one_score_block_over_all / 4


def test_transient_rejects_negative_context():
    with pytest.raises(ValueError, match="context"):
        memory.prefill_transient_bytes(tiny_config(**REDUCED), 128, -1)


def test_estimate_only_counts_weights_cache_and_prefill_transient():
    from mlx_dsv4.convert.estimate import PREFILL_CHUNK, RUNTIME_OVERHEAD, estimate_config
    from mlx_dsv4.convert.recipes import Recipe
    from mlx_dsv4.convert.presets import PRESETS

    cfg = PRESETS["flash"]
    for context in (32768, 1 << 20):
        est = estimate_config(cfg, Recipe(name="q2"), context)
        transient = memory.prefill_transient_bytes(cfg, PREFILL_CHUNK, context - PREFILL_CHUNK)
        assert est.transient_bytes == transient > 0
        assert est.memory_bytes == est.model_bytes + memory.kv_bytes(cfg, context) + transient + RUNTIME_OVERHEAD
        assert f"prefill transient ({PREFILL_CHUNK}-token chunks) {transient / 1e9:.2f}" in est.lines()[-1]
