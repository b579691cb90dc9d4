"""The one place that decides which implementation of each device-dependent step runs.

MLX's CPU backend lacks some fused or half-precision kernels that Metal and CUDA have, so a
few steps have a CPU implementation and an accelerator one. `device_paths()` gives the
choices for the default device; the model code asks it and checks the device nowhere else.

For tests, the accelerator's choices can be forced on the CPU (``with forced_paths("accelerator"):``
or MLX_DSV4_FORCE_PATHS=accelerator), and the CPU's anywhere ("cpu"). A forced choice the CPU
cannot run at all stays the CPU's (see `DevicePaths.half_experts`).
"""

import contextlib
import functools
from contextvars import ContextVar
from dataclasses import dataclass
import logging
import os
from typing import Optional

import mlx.core as mx

FORCE_ENV = "MLX_DSV4_FORCE_PATHS"
KINDS = ("cpu", "accelerator")
_forced: ContextVar[Optional[str]] = ContextVar("mlx_dsv4_forced_paths", default=None)
log = logging.getLogger("mlx_dsv4")


@dataclass(frozen=True)
class DevicePaths:
    """device: the default device ("cpu" or "gpu"); kind: whose choices these are.

    decode_attention: one query's attention, "sdpa" (mx.fast.scaled_dot_product_attention with
    sinks) or "matmul" (the CPU has no fused kernel: all heads share the one kv head, so one
    [H, hd] x [hd, T] product scores them).
    half_experts: bf16/f16 routed experts, "gather_mm" (mlx-lm's SwitchLinear, native dtype) or
    "float32" (the CPU's gather_mm runs in float32 only; even forced, the CPU keeps this one).
    index_scores: a decoding query against mxfp4/mxfp8 indexer keys, "quantized_matmul" (the
    codes are read as stored) or "dequantize" (decoded to float first; only the comparison in
    tests asks for it).
    streams: "cpu" (independent work split over CPU streams when MLX_DSV4_CPU_STREAMS allows)
    or "default" (one stream; the device parallelises within each op).
    """

    device: str
    kind: str
    decode_attention: str
    half_experts: str
    index_scores: str
    streams: str

    def describe(self, n_streams: int = 1, expert_weights: str = "bfloat16") -> list:
        """(what, path) pairs for the CLI and the log; expert_weights: the routed experts' dtype
        name, or "quantized"."""
        if expert_weights == "quantized":
            experts = "gather_qmm (quantized weights)"
        elif expert_weights == "float32" or self.half_experts == "gather_mm":
            experts = f"gather_mm ({expert_weights} weights)"
        else:
            experts = f"gather_mm in float32 ({expert_weights} weights upcast)"
        return [
            ("device", f"{self.device} ({self.kind} paths)"),
            ("attention decode", self.decode_attention),
            ("expert matmul", experts),
            ("indexer scores", self.index_scores),
            ("streams", f"{n_streams} CPU streams" if n_streams > 1 else "default stream"),
        ]


@functools.lru_cache(maxsize=None)
def paths_for(device_type, kind: Optional[str] = None) -> DevicePaths:
    """The choices on a device of `device_type` (mx.DeviceType); kind: force "cpu" or "accelerator"."""
    on_cpu = device_type == mx.DeviceType.cpu
    if kind is None:
        kind = "cpu" if on_cpu else "accelerator"
    if kind not in KINDS:
        raise ValueError(f"{FORCE_ENV}: expected one of {', '.join(KINDS)}, got {kind!r}")
    cpu = kind == "cpu"
    return DevicePaths(
        device="cpu" if on_cpu else "gpu",
        kind=kind,
        decode_attention="matmul" if cpu else "sdpa",
        half_experts="float32" if cpu or on_cpu else "gather_mm",
        index_scores="quantized_matmul",
        streams="cpu" if cpu else "default",
    )


def device_paths() -> DevicePaths:
    """The choices in force: the innermost `forced_paths`, else $MLX_DSV4_FORCE_PATHS, else the device's."""
    forced = _forced.get()
    if forced is None:
        forced = os.environ.get(FORCE_ENV) or None
    if isinstance(forced, DevicePaths):
        return forced
    return paths_for(mx.default_device().type, forced)


@contextlib.contextmanager
def forced_paths(kind, **choices):
    """Within the block (this thread or task only), use `kind`'s choices ("cpu" or "accelerator"),
    with `choices` (DevicePaths fields) overriding single ones."""
    chosen = paths_for(mx.default_device().type, kind)
    if choices:
        chosen = DevicePaths(**{**chosen.__dict__, **choices})
    token = _forced.set(chosen)
    try:
        yield chosen
    finally:
        _forced.reset(token)


def log_paths(n_streams: int = 1, expert_weights: str = "bfloat16") -> DevicePaths:
    """Log the choices in force (once per model load), and return them."""
    chosen = device_paths()
    log.info("mlx-dsv4 paths: %s", "; ".join(f"{what} {path}" for what, path in chosen.describe(n_streams, expert_weights)))
    return chosen
