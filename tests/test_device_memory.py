"""Wired-memory limit during generation and the fit check before loading, on the CPU with the
Metal device's figures (and the system's memory) faked."""

import warnings

import mlx.core as mx
import pytest

from mlx_dsv4 import device_memory, loader, memory
from mlx_dsv4.convert.estimate import TABLE_RECIPES, estimate_config
from mlx_dsv4.convert.recipes import Recipe
from mlx_dsv4.device_memory import MemoryFitError, MemoryFitWarning, wired_limit
from mlx_dsv4.generate import generate, stream_generate
from mlx_dsv4.tiny import tiny_config, write_tiny_checkpoint

GB = 10**9


@pytest.fixture
def fake_metal(monkeypatch):
    """A Metal device with 64 GB of memory and a 48 GB recommended working set; records the
    wired-limit calls (MLX returns the previous limit)."""
    calls = []
    state = {"limit": 7}

    def set_wired_limit(n):
        calls.append(n)
        previous, state["limit"] = state["limit"], n
        return previous

    info = {"memory_size": 64 * GB, "max_recommended_working_set_size": 48 * GB, "architecture": "applegpu"}
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: dict(info), raising=False)
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    monkeypatch.setattr(mx, "synchronize", lambda *a: None)
    return calls, state, info


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("fit") / "tiny", seed=0)
    model, tokenizer = loader.load(path, check_memory=False)
    return path, model, tokenizer


def test_wired_limit_sets_the_working_set_and_restores(fake_metal):
    calls, state, _ = fake_metal
    with wired_limit():
        assert calls == [48 * GB]
        with wired_limit():  # nested: one setting
            pass
        assert calls == [48 * GB]
    assert calls == [48 * GB, 7] and state["limit"] == 7


def test_wired_limit_is_restored_after_an_error(fake_metal):
    calls, state, _ = fake_metal
    with pytest.raises(RuntimeError):
        with wired_limit():
            raise RuntimeError("boom")
    assert calls == [48 * GB, 7]


def test_wired_limit_warns_when_the_model_cannot_be_wired(fake_metal, tiny):
    _, model, _ = tiny
    calls, _, info = fake_metal
    info["max_recommended_working_set_size"] = 1000  # bytes: far below the tiny model
    with pytest.warns(MemoryFitWarning, match="can be wired"):
        with wired_limit(model):
            pass
    assert calls == [1000, 7]


def test_wired_limit_does_nothing_off_metal(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: pytest.fail("set_wired_limit called off Metal"))
    with wired_limit():
        pass


def test_generation_runs_inside_the_wired_limit(fake_metal, tiny):
    _, model, tokenizer = tiny
    calls, state, _ = fake_metal
    seen = []
    for step in stream_generate(model, tokenizer, [0, 5, 6], max_tokens=3):
        seen.append(state["limit"])
    assert seen == [48 * GB] * 3 and calls == [48 * GB, 7]
    steps = stream_generate(model, tokenizer, [0, 5, 6], max_tokens=5)
    next(steps)
    assert state["limit"] == 48 * GB
    steps.close()  # a client that stops early
    assert state["limit"] == 7
    generate(model, tokenizer, [0, 5], max_tokens=2)
    assert state["limit"] == 7


def _weights(path):
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _fake_system_memory(monkeypatch, total, available):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(device_memory, "_meminfo", lambda: {"MemTotal": total, "MemAvailable": available})


def _refuse_reading(monkeypatch):
    monkeypatch.setattr(loader, "read_weights", lambda path: pytest.fail("weights read before the fit check"))


def test_load_refuses_weights_larger_than_memory_before_reading_them(tiny, monkeypatch):
    path, _, _ = tiny
    _fake_system_memory(monkeypatch, total=_weights(path) // 2, available=_weights(path) // 2)
    _refuse_reading(monkeypatch)
    with pytest.raises(MemoryFitError, match=r"weights are .* more than this machine's") as e:
        loader.load_model(path)
    assert str(path) in str(e.value)


def test_load_warns_and_names_a_recipe_that_fits(tiny, monkeypatch):
    path, _, _ = tiny
    cfg = tiny_config()
    first = estimate_config(cfg, Recipe(**TABLE_RECIPES[0][1]), 32768, include_mtp=False)
    smallest = min(TABLE_RECIPES, key=lambda r: estimate_config(cfg, Recipe(**r[1]), 32768, include_mtp=False).model_bytes)
    small = estimate_config(cfg, Recipe(**smallest[1]), 32768, include_mtp=False)
    budget = memory.run_bytes(cfg, 32768, small.model_bytes)
    assert budget < memory.run_bytes(cfg, 32768, first.model_bytes)
    # enough physical memory for the weights, too little to keep them and the cache resident
    _fake_system_memory(monkeypatch, total=_weights(path) * 2, available=budget)
    with pytest.warns(MemoryFitWarning, match=r"FP8 cache for 32768 tokens") as record:
        loader.load_model(path)
    message = str(record[0].message)
    label = message.split("`mlx-dsv4 convert --recipe ", 1)[1].split("`", 1)[0]
    named = estimate_config(cfg, Recipe(**dict(TABLE_RECIPES)[label]), 32768, include_mtp=False)
    assert memory.run_bytes(cfg, 32768, named.model_bytes) <= budget


def test_metal_working_set_is_the_budget(tiny, monkeypatch, fake_metal):
    path, _, _ = tiny
    _, _, info = fake_metal
    info["memory_size"] = _weights(path) * 4
    info["max_recommended_working_set_size"] = _weights(path) // 2
    with pytest.warns(MemoryFitWarning, match="Metal recommended working set"):
        loader.load_model(path, context=1024)
    info["memory_size"] = _weights(path) // 2
    _refuse_reading(monkeypatch)
    with pytest.raises(MemoryFitError):
        loader.load_model(path)


def test_load_is_silent_when_it_fits(tiny, monkeypatch):
    path, _, _ = tiny
    _fake_system_memory(monkeypatch, total=100 * GB, available=50 * GB)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.load_model(path)
    _refuse_reading(monkeypatch)
    with pytest.raises(BaseException):  # check_memory=False goes straight to reading
        loader.load_model(path, check_memory=False)


def test_load_counts_the_prefill_transient(tiny, monkeypatch):
    path, _, _ = tiny
    cfg = tiny_config()
    weights = _weights(path)
    need = weights + memory.kv_bytes(cfg, 32768) + memory.prefill_transient_bytes(cfg, 2048, 32768 - 2048)
    assert memory.run_bytes(cfg, 32768, weights) == need
    _fake_system_memory(monkeypatch, total=weights * 4, available=need)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.load_model(path)
    # the same machine, with a transient 1 GB larger: weights and cache fit, the transient does not
    real_transient = memory.prefill_transient_bytes
    monkeypatch.setattr(memory, "prefill_transient_bytes", lambda *a, **k: real_transient(*a, **k) + GB)
    with pytest.warns(MemoryFitWarning, match=r"prefill transient \(2048-token chunks\) 1\.\d\d GB exceed"):
        loader.load_model(path)
