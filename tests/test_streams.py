"""CPU streams: work split across cores gives what one stream gives."""

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

    def use(n):
        monkeypatch.setattr(streams, "MAX_STREAMS", n)
        return streams.parallel_streams()

    return use


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
