"""Using every core on MLX's CPU backend.

MLX runs each CPU stream on its own thread, while one op runs on one thread (the CPU
wheel's BLAS included). Independent pieces of a step placed on different CPU streams
therefore run side by side. Other devices parallelise within each op and keep the
default stream.
"""

import contextlib
import functools
import os
from typing import Callable

import mlx.core as mx

MAX_STREAMS = 4
MIN_TOKENS_PER_PART = 256  # below this, splitting costs more in dispatch than it saves


@functools.lru_cache(maxsize=None)
def _cpu_streams(n: int) -> tuple:
    return (mx.default_stream(mx.cpu),) + tuple(mx.new_stream(mx.cpu) for _ in range(n - 1))


def parallel_streams() -> tuple:
    """One stream per core (at most MAX_STREAMS) on the CPU backend; (None,) elsewhere."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return (None,)
    return _cpu_streams(max(1, min(os.cpu_count() or 1, MAX_STREAMS)))


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
