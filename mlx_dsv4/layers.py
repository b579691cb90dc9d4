"""Norms and gathered (per-expert) / grouped (per-head-group) linear layers."""

import mlx.core as mx
import mlx.nn as nn

from .mlx_lm_import import import_mlx_lm
from .paths import device_paths

_switch_layers = import_mlx_lm("models.switch_layers")
SwitchLinear, QuantizedSwitchLinear = _switch_layers.SwitchLinear, _switch_layers.QuantizedSwitchLinear


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose output keeps the input's dtype.

    The release stores norm weights in float32; like the reference, the product is
    taken in float32 and cast back, so bf16 activations stay bf16.
    """

    def __call__(self, x):
        return mx.fast.rms_norm(x, self["weight"], self.eps).astype(x.dtype)


def _cpu_half(w: mx.array) -> bool:
    return w.dtype != mx.float32 and device_paths().half_experts == "float32"


class GatheredLinear(SwitchLinear):
    """mlx-lm's SwitchLinear with a portable path for half-precision weights.

    MLX's CPU gather_mm only runs in float32 (quantised gathers run in any
    dtype), so on the CPU backend unquantised bf16/f16 weights go through
    float32: only the experts in use when few are, all of them otherwise.
    Metal and CUDA take the native path (`DevicePaths.half_experts`).
    """

    def __call__(self, x, indices, sorted_indices=False):
        w = self["weight"]
        if not _cpu_half(w):
            return super().__call__(x, indices, sorted_indices)
        if indices.size < w.shape[0]:
            picked = w[indices].astype(mx.float32)  # [..., k, out, in]
            return (x.astype(mx.float32) @ picked.swapaxes(-1, -2)).astype(x.dtype)
        y = mx.gather_mm(
            x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2),
            rhs_indices=indices, sorted_indices=sorted_indices,
        )
        return y.astype(x.dtype)


def expert_weights(model) -> str:
    """The routed experts' weight dtype name ("quantized" when quantised; "none" without experts)."""
    for _, module in model.named_modules():
        if isinstance(module, GatheredLinear):
            return str(module["weight"].dtype).rsplit(".", 1)[-1]
        if isinstance(module, QuantizedSwitchLinear):
            return "quantized"
    return "none"


class GroupedLinear(SwitchLinear):
    """One weight slice per group: x [..., G, 1, in] -> [..., G, 1, out].

    Every group is used on every call, so unquantised weights need no gather;
    quantised (QuantizedSwitchLinear, via to_quantized) gather by group index.
    """

    def __call__(self, x, indices, sorted_indices=False):
        return x @ self["weight"].swapaxes(-1, -2)
