"""Using every core on MLX's CPU backend (opt-in: MLX_DSV4_CPU_STREAMS=N).

MLX runs each CPU stream on its own thread, while one op runs on one thread (the CPU
wheel's BLAS included). Independent pieces of a step placed on different CPU streams
therefore run side by side. Other devices parallelise within each op and keep the
default stream.

Off by default: MLX does not promise thread safety across streams, and one long run at
V4-Flash widths with two streams ended in a segmentation fault inside libmlx (not
reproduced on a second run).
"""

import contextlib
import functools
import os
from typing import Callable

import mlx.core as mx

MAX_STREAMS = int(os.environ.get("MLX_DSV4_CPU_STREAMS", "1"))  # 1: every op on the default stream
MIN_TOKENS_PER_PART = 256  # below this, splitting costs more in dispatch than it saves


@functools.lru_cache(maxsize=None)
def _cpu_streams(n: int) -> tuple:
    return (mx.default_stream(mx.cpu),) + tuple(mx.new_stream(mx.cpu) for _ in range(n - 1))


def parallel_streams() -> tuple:
    """One stream per core, at most MAX_STREAMS, on the CPU backend; (None,) elsewhere or when 1."""
    n = min(os.cpu_count() or 1, MAX_STREAMS)
    if mx.default_device().type != mx.DeviceType.cpu or n < 2:
        return (None,)
    return _cpu_streams(n)


def on(stream):
    """Context placing ops on `stream` (None: the default stream)."""
    return mx.stream(stream) if stream is not None else contextlib.nullcontext()


def split_tokens(fn: Callable, *arrays: mx.array, pass_first: bool = False):
    """fn(*arrays) for arrays [B, L, ...] whose positions are independent, run as parts of the
    token axis on parallel streams and joined along axis 1; a tuple result is joined
    element-wise. pass_first: call fn(first, *parts), first = the part's index in L."""
    streams = parallel_streams()
    L = arrays[0].shape[1]
    n = min(len(streams), L // MIN_TOKENS_PER_PART)
    if n < 2:
        return fn(0, *arrays) if pass_first else fn(*arrays)
    bounds = [L * i // n for i in range(n + 1)]
    parts = []
    for i in range(n):
        with on(streams[i]):
            part = tuple(a[:, bounds[i] : bounds[i + 1]] for a in arrays)
            parts.append(fn(bounds[i], *part) if pass_first else fn(*part))
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate(p, axis=1) for p in zip(*parts))
    return mx.concatenate(parts, axis=1)


def split_outputs(layer, x: mx.array) -> mx.array:
    """layer(x) for a bias-free nn.Linear or nn.QuantizedLinear, its output features split
    across parallel streams, so that a large matrix-vector product (the vocabulary head
    in decoding) reads its weight on every core."""
    streams = parallel_streams()
    w = layer["weight"]
    n = min(len(streams), w.shape[0] // 1024)
    if n < 2 or "bias" in layer:
        return layer(x)
    bounds = [w.shape[0] * i // n for i in range(n + 1)]
    parts = []
    for i in range(n):
        rows = slice(bounds[i], bounds[i + 1])
        with on(streams[i]):
            if "scales" in layer:
                biases = layer.get("biases")
                parts.append(mx.quantized_matmul(
                    x, w[rows], scales=layer["scales"][rows], biases=None if biases is None else biases[rows],
                    transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode))
            else:
                parts.append(x @ w[rows].T)
    return mx.concatenate(parts, axis=-1)
