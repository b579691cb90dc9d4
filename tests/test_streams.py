"""CPU streams: work split across cores gives what one stream gives."""

import contextlib
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_dsv4
from mlx_dsv4 import streams
from conftest import PARITY_VOCAB

needs_two = pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="streams split work on the CPU backend only")


@pytest.fixture
def stream_count(monkeypatch):
    monkeypatch.setattr(streams.os, "cpu_count", lambda: 2)
    with contextlib.ExitStack() as scopes:

        def use(n):
            scopes.enter_context(streams.cpu_stream_limit(n))
            return streams.parallel_streams()

        yield use


def test_stream_limit_is_scoped_and_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv(streams.STREAMS_ENV, "3")
    assert streams.max_cpu_streams() == 3
    with streams.cpu_stream_limit(2):
        assert streams.max_cpu_streams() == 2
        with streams.cpu_stream_limit(1):
            assert streams.max_cpu_streams() == 1
        with streams.cpu_stream_limit(None):
            assert streams.max_cpu_streams() == 2
        seen_by_another_thread = []
        thread = threading.Thread(target=lambda: seen_by_another_thread.append(streams.max_cpu_streams()))
        thread.start()
        thread.join()
        assert seen_by_another_thread == [3]
    assert streams.max_cpu_streams() == 3
    with pytest.raises(RuntimeError), streams.cpu_stream_limit(4):
        raise RuntimeError("leaving the block by an exception restores the setting too")
    assert streams.max_cpu_streams() == 3
    monkeypatch.delenv(streams.STREAMS_ENV)
    assert streams.max_cpu_streams() == 1


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_bad_stream_setting_is_named(monkeypatch, bad):
    monkeypatch.setenv(streams.STREAMS_ENV, bad)
    with pytest.raises(ValueError, match=f"MLX_DSV4_CPU_STREAMS .*{bad!r}"):
        streams.max_cpu_streams()
    with pytest.raises(ValueError, match="positive integer, got 0"), streams.cpu_stream_limit(0):
        pass


@needs_two
def test_split_tokens_joins_parts_in_order(stream_count):
    assert len(stream_count(2)) == 2
    x = mx.arange(2 * 600 * 3).reshape(2, 600, 3).astype(mx.float32)
    seen = []

    def fn(first, part):
        seen.append((first, part.shape[1]))
        return part * 2, part[..., :1] + first

    doubled, offsets = streams.split_tokens(fn, x, pass_first=True)
    assert seen == [(0, 300), (300, 300)]
    assert mx.array_equal(doubled, x * 2)
    assert mx.array_equal(offsets[:, 300:], x[:, 300:, :1] + 300)
    assert len(stream_count(1)) == 1
    seen.clear()
    streams.split_tokens(fn, x, pass_first=True)
    assert seen == [(0, 600)]


@needs_two
@pytest.mark.parametrize("quantized", [False, True])
def test_split_outputs_matches_the_layer(stream_count, quantized):
    stream_count(2)
    layer = nn.Linear(64, 4096, bias=False)
    if quantized:
        layer = nn.QuantizedLinear.from_linear(layer, group_size=32, bits=4)
    x = mx.random.normal((1, 1, 64))
    assert np.allclose(np.array(streams.split_outputs(layer, x)), np.array(layer(x)), rtol=1e-5, atol=1e-5)


@needs_two
def test_model_gives_the_same_logits_on_one_and_two_streams(tiny_dirs, stream_count):
    model = mlx_dsv4.load_model(tiny_dirs["flash"])
    tokens = mx.array(np.random.default_rng(5).integers(0, PARITY_VOCAB, (1, 700)))
    runs = {}
    for n in (1, 2):
        stream_count(n)
        cache = model.make_cache()
        out = [model(tokens[:, :600], cache=cache)]
        out += [model(tokens[:, t : t + 1], cache=cache) for t in range(600, 700)]
        runs[n] = np.array(mx.concatenate(out, axis=1))
    scale = np.abs(runs[1]).max()
    assert np.abs(runs[1] - runs[2]).max() / scale < 1e-5
