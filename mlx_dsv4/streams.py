"""Using every core on MLX's CPU backend (opt-in: MLX_DSV4_CPU_STREAMS=N, or
``with cpu_stream_limit(N):`` around the work).

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
from contextvars import ContextVar
from typing import Callable, Optional

import mlx.core as mx

from .paths import device_paths

STREAMS_ENV = "MLX_DSV4_CPU_STREAMS"
_stream_limit: ContextVar[Optional[int]] = ContextVar("mlx_dsv4_cpu_stream_limit", default=None)
MIN_TOKENS_PER_PART = 256  # below this, splitting costs more in dispatch than it saves


def max_cpu_streams() -> int:
    """The most CPU streams work is split over here: the innermost cpu_stream_limit, else
    $MLX_DSV4_CPU_STREAMS, else 1 (every op on the default stream)."""
    limit = _stream_limit.get()
    if limit is not None:
        return limit
    text = os.environ.get(STREAMS_ENV, "1")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{STREAMS_ENV} must be a positive number of streams, got {text!r}")
    return value


@contextlib.contextmanager
def cpu_stream_limit(n: Optional[int]):
    """Within the block (in this thread or task only), split work over at most ``n`` CPU
    streams; None keeps the setting in force."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of CPU streams must be a positive integer, got {n!r}")
    token = _stream_limit.set(n)
    try:
        yield
    finally:
        _stream_limit.reset(token)


@functools.lru_cache(maxsize=None)
def _cpu_streams(n: int) -> tuple:
    return (mx.default_stream(mx.cpu),) + tuple(mx.new_stream(mx.cpu) for _ in range(n - 1))


def parallel_streams() -> tuple:
    """One stream per core, at most max_cpu_streams(), on the CPU backend; (None,) elsewhere or when 1."""
    n = min(os.cpu_count() or 1, max_cpu_streams())
    if device_paths().streams != "cpu" or n < 2:
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
