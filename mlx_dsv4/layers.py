"""Gathered (per-expert / per-group) linear layers."""

import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchLinear


class GatheredLinear(SwitchLinear):
    """mlx-lm's SwitchLinear with a portable path for half-precision weights.

    MLX's CPU gather_mm only runs in float32 (quantised gathers run in any
    dtype), so on the CPU backend unquantised bf16/f16 weights go through
    float32 there; Metal and CUDA take the native path.
    """

    def __call__(self, x, indices, sorted_indices=False):
        w = self["weight"]
        if w.dtype == mx.float32 or mx.default_device().type != mx.DeviceType.cpu:
            return super().__call__(x, indices, sorted_indices)
        y = mx.gather_mm(
            x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2),
            rhs_indices=indices, sorted_indices=sorted_indices,
        )
        return y.astype(x.dtype)
