"""Device paths: the accelerator's choices, forced on the CPU, give the CPU's logits."""

import logging

import mlx.core as mx
import numpy as np
import pytest

import mlx_dsv4
from mlx_dsv4 import paths, streams
from mlx_dsv4.layers import GatheredLinear
from conftest import PARITY_VOCAB

PREFILL_CHUNKS = (300, 260)  # each over one 128-query block: blocks are evaluated in turn
DECODE_STEPS = 24


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {name: mlx_dsv4.load_model(d) for name, d in tiny_dirs.items()}


@pytest.fixture
def calls(monkeypatch):
    """Counts the single-query fused attention calls and the quantized indexer scores."""
    seen = {"sdpa_one_query": 0, "quantized_matmul": 0}
    sdpa, qmm = mx.fast.scaled_dot_product_attention, mx.quantized_matmul

    def counting_sdpa(q, *args, **kwargs):
        seen["sdpa_one_query"] += q.shape[2] == 1
        return sdpa(q, *args, **kwargs)

    def counting_qmm(*args, **kwargs):
        seen["quantized_matmul"] += 1
        return qmm(*args, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(mx, "quantized_matmul", counting_qmm)
    return seen


def run(model, tokens, **cache_options):
    """Logits of a chunked prefill then one-token decoding steps, float32 [L, vocab]."""
    cache = model.make_cache(**cache_options)
    out, start = [], 0
    for n in PREFILL_CHUNKS:
        out.append(model(tokens[:, start : start + n], cache=cache))
        start += n
    for t in range(start, tokens.shape[1]):
        out.append(model(tokens[:, t : t + 1], cache=cache))
    return np.array(mx.concatenate(out, axis=1)[0].astype(mx.float32))


def assert_close(a, b, rel=1e-5):
    assert a.shape == b.shape
    assert np.abs(a - b).max() / np.abs(a).max() < rel, np.abs(a - b).max() / np.abs(a).max()


@pytest.mark.parametrize("name", ["flash", "pro"])
@pytest.mark.parametrize("cache_options", [{}, {"kv_dtype": "float", "index_dtype": "fp8"}], ids=["fp8-fp4", "float-fp8"])
def test_accelerator_paths_give_the_cpu_logits(models, name, cache_options, calls):
    tokens = mx.array(np.random.default_rng(3).integers(0, PARITY_VOCAB, (1, sum(PREFILL_CHUNKS) + DECODE_STEPS)))
    with paths.forced_paths("cpu"):
        cpu = run(models[name], tokens, **cache_options)
    assert calls["sdpa_one_query"] == 0
    with paths.forced_paths("accelerator") as chosen:
        assert (chosen.decode_attention, chosen.streams) == ("sdpa", "default")
        accelerator = run(models[name], tokens, **cache_options)
    assert calls["sdpa_one_query"] >= DECODE_STEPS * len(models[name].args.compress_ratios)
    assert_close(cpu, accelerator)


@pytest.mark.parametrize("index_dtype", ["fp4", "fp8"])
def test_quantized_indexer_scores_match_dequantized_keys(models, index_dtype, calls):
    tokens = mx.array(np.random.default_rng(4).integers(0, PARITY_VOCAB, (1, sum(PREFILL_CHUNKS) + DECODE_STEPS)))
    with paths.forced_paths("accelerator", index_scores="dequantize"):
        dequantized = run(models["flash"], tokens, kv_dtype="float", index_dtype=index_dtype)
    assert calls["quantized_matmul"] == 0
    with paths.forced_paths("accelerator"):
        quantized = run(models["flash"], tokens, kv_dtype="float", index_dtype=index_dtype)
    assert calls["quantized_matmul"] >= DECODE_STEPS
    assert_close(dequantized, quantized)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n_picked", [3, 16], ids=["few-experts", "all-experts"])
def test_half_precision_experts_on_the_cpu_compute_the_native_gather(dtype, n_picked):
    layer = GatheredLinear(32, 48, num_experts=8, bias=False)
    layer.weight = layer.weight.astype(dtype)
    x = mx.random.normal((n_picked, 1, 1, 32), key=mx.random.key(1)).astype(dtype)
    indices = mx.random.randint(0, 8, (n_picked, 1), key=mx.random.key(2))
    with paths.forced_paths("cpu") as chosen:
        assert chosen.half_experts == "float32"
        out = layer(x, indices)
    assert out.dtype == dtype
    # gather_mm as Metal and CUDA run it on the half-precision weights: float32 products and sums
    native = mx.gather_mm(x.astype(mx.float32), layer.weight.astype(mx.float32).swapaxes(-1, -2),
                          rhs_indices=indices).astype(dtype)
    if mx.default_device().type != mx.DeviceType.cpu:
        with paths.forced_paths("accelerator") as chosen:
            assert chosen.half_experts == "gather_mm"
            native = layer(x, indices)
    assert_close(np.array(native.astype(mx.float32)), np.array(out.astype(mx.float32)), rel=1e-2)
    assert np.mean(np.array(native == out)) > 0.95


def test_each_device_gets_its_own_paths_and_forcing_is_scoped(monkeypatch):
    cpu, gpu = paths.paths_for(mx.DeviceType.cpu), paths.paths_for(mx.DeviceType.gpu)
    assert (cpu.kind, cpu.decode_attention, cpu.half_experts, cpu.streams) == ("cpu", "matmul", "float32", "cpu")
    assert (gpu.kind, gpu.decode_attention, gpu.half_experts, gpu.streams) == ("accelerator", "sdpa", "gather_mm", "default")
    assert cpu.index_scores == gpu.index_scores == "quantized_matmul"
    # the CPU has no half-precision gather_mm: forced, it keeps the float32 one
    assert paths.paths_for(mx.DeviceType.cpu, "accelerator").half_experts == "float32"
    assert paths.paths_for(mx.DeviceType.gpu, "cpu").half_experts == "float32"

    monkeypatch.delenv(paths.FORCE_ENV, raising=False)
    device = paths.device_paths()
    assert device == paths.paths_for(mx.default_device().type)
    monkeypatch.setenv(paths.FORCE_ENV, "accelerator")
    assert paths.device_paths().decode_attention == "sdpa"
    with paths.forced_paths("cpu"):
        assert paths.device_paths().decode_attention == "matmul"
    assert paths.device_paths().decode_attention == "sdpa"
    monkeypatch.setenv(paths.FORCE_ENV, "gpu")
    with pytest.raises(ValueError, match="MLX_DSV4_FORCE_PATHS: expected one of cpu, accelerator, got 'gpu'"):
        paths.device_paths()


@pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="CPU streams split work on the CPU only")
def test_streams_follow_the_paths(monkeypatch):
    monkeypatch.setattr(streams.os, "cpu_count", lambda: 2)
    with streams.cpu_stream_limit(2):
        with paths.forced_paths("cpu"):
            assert len(streams.parallel_streams()) == 2
        with paths.forced_paths("accelerator"):
            assert streams.parallel_streams() == (None,)


def test_expert_path_follows_the_weights():
    described = {w: dict(paths.paths_for(mx.DeviceType.cpu).describe(2, w))["expert matmul"]
                 for w in ("bfloat16", "float32", "quantized")}
    assert described == {"bfloat16": "gather_mm in float32 (bfloat16 weights upcast)",
                         "float32": "gather_mm (float32 weights)", "quantized": "gather_qmm (quantized weights)"}
    assert dict(paths.paths_for(mx.DeviceType.gpu).describe(1, "bfloat16"))["expert matmul"] == "gather_mm (bfloat16 weights)"
    assert dict(paths.paths_for(mx.DeviceType.cpu).describe(2))["streams"] == "2 CPU streams"


@pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="names the CPU's paths")
def test_paths_are_logged_once_at_load(tiny_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="mlx_dsv4"):
        mlx_dsv4.load_model(tiny_dirs["flash"])
    records = [r.getMessage() for r in caplog.records if r.name == "mlx_dsv4"]
    assert records == ["mlx-dsv4 paths: device cpu (cpu paths); attention decode matmul; "
                       "expert matmul gather_mm (float32 weights); indexer scores quantized_matmul; "
                       "streams default stream"]
