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


# Reduced widths where the attention's transient, not the hyper-connection streams', is the peak: few
# wide heads, wide indexer keys, a small top-k (so that past 16K tokens each query block decodes its
# own picks).
ATTENTION_BOUND = dict(REDUCED, hidden_size=128, num_attention_heads=2, head_dim=512, index_n_heads=2,
                       index_head_dim=256, index_topk=32)
CHUNK = 2048


def cache_at(model, offset: int):
    """A cache holding `offset` tokens of random rows and entries, stored as the model stores them:
    what a prefill would leave, in a fraction of its time."""
    from mlx_dsv4.kvcodec import index_rotation

    cache = model.make_cache("fp8", "fp4")
    mx.random.seed(offset)
    arrays = {}
    for name, (shape, dtype) in cache.layout(offset).items():
        stored = name.rsplit(".", 1)[0]
        if stored.endswith((".ring", ".entries")):
            if f"{stored}.0" not in arrays:
                layer = cache.layers[int(name.split(".")[1])]
                codec = layer.kv_codec if stored.endswith(".ring") else getattr(layer, name.split(".")[2]).codec
                rows = mx.random.normal((shape[0], shape[1], codec.head_dim)).astype(codec.dtype)
                arrays.update((f"{stored}.{i}", p) for i, p in enumerate(codec.encode(rows)))
        else:
            arrays[name] = mx.random.normal(shape).astype(dtype)
    mx.eval(arrays)
    meta = {"offset": str(offset), "ratios": ",".join(str(layer.ratio) for layer in cache.layers),
            "kv_dtype": "fp8", "index_dtype": "fp4", "index_rotation": index_rotation("fp4")}
    cache.check_state(arrays, meta)
    cache.load_state(arrays, meta)
    return cache


@pytest.fixture(scope="module")
def measured_peaks(tmp_path_factory):
    """MLX's peak beyond what is held, of one 2048-token chunk after 8K and 32K tokens, per setting."""
    peaks = {}
    for label, widths in (("reduced", REDUCED), ("attention-bound", ATTENTION_BOUND)):
        path = write_tiny_checkpoint(tmp_path_factory.mktemp(label) / "m", preset="flash", seed=0,
                                     dtype="bfloat16", mtp=False, **widths)
        model = mlx_dsv4.load_model(path)
        tokens = mx.array(np.random.default_rng(0).integers(2, 1000, (1, CHUNK)))
        for context in (8192, 32768):
            cache = cache_at(model, context)
            gc.collect()
            mx.clear_cache()
            held = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(model(tokens, cache, last_only=True), cache.state())
            peaks[label, context] = mx.get_peak_memory() - held
            del cache
        del model
        gc.collect()
        mx.clear_cache()
    return peaks


@pytest.mark.parametrize("label, widths", [("reduced", REDUCED), ("attention-bound", ATTENTION_BOUND)])
@pytest.mark.parametrize("context", [8192, 32768])
def test_predicted_chunk_peak_within_15_percent_of_measured(measured_peaks, label, widths, context):
    measured = measured_peaks[label, context]
    predicted = memory.prefill_peak_bytes(tiny_config(**widths), CHUNK, context, "fp8", "fp4", "bfloat16")
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_chunk_transient_does_not_grow_with_the_context(measured_peaks):
    """What the bench's target (transient at 256K <= 1.2x that at 32K) rests on: at widths where the
    attention's transient is the peak, a chunk after 32K tokens peaks at most 1.2x one after 8K."""
    for label in ("reduced", "attention-bound"):
        assert measured_peaks[label, 32768] <= 1.2 * measured_peaks[label, 8192], label
    cfg = tiny_config(**ATTENTION_BOUND)
    predicted = [memory.prefill_transient_bytes(cfg, CHUNK, c) for c in (8192, 32768, 1 << 18, 1 << 20)]
    assert max(predicted) <= 1.2 * predicted[0]


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
