"""Interleaved partial RoPE on the trailing rope dims of each head.

Layers with compress ratio 0 use `rope_theta` unscaled; compressed layers,
their compressors and the indexer use `compress_rope_theta` with YaRN
frequency interpolation. The YaRN magnitude correction is not applied.
"""

import math

import mlx.core as mx

from .config import ModelArgs


def default_inv_freq(dim: int, base: float) -> mx.array:
    return 1.0 / (base ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))


def yarn_inv_freq(dim: int, base: float, factor: float, original_max: int, beta_fast: float, beta_slow: float):
    def correction_dim(rotations):
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    pos_freqs = base ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def inv_freq_for(args: ModelArgs, compressed: bool) -> mx.array:
    dim = args.qk_rope_head_dim
    if not compressed:
        return default_inv_freq(dim, args.rope_theta)
    yarn = args.yarn
    if yarn is None:
        return default_inv_freq(dim, args.compress_rope_theta)
    return yarn_inv_freq(
        dim,
        args.compress_rope_theta,
        float(yarn["factor"]),
        int(yarn["original_max_position_embeddings"]),
        float(yarn.get("beta_fast") or 32),
        float(yarn.get("beta_slow") or 1),
    )


class Rope:
    """Rotates pairs (2j, 2j+1) of the last `dims` features at positions (offset + i) * stride."""

    def __init__(self, inv_freq: mx.array):
        self.dims = inv_freq.shape[0] * 2
        self._periods = 1.0 / inv_freq

    def __call__(self, x: mx.array, offset: int, stride: int = 1, inverse: bool = False) -> mx.array:
        rd = self.dims
        freqs = -self._periods if inverse else self._periods
        rotated = mx.fast.rope(
            x[..., -rd:], rd, traditional=True, base=None, scale=float(stride), offset=offset, freqs=freqs
        )
        return mx.concatenate([x[..., :-rd], rotated], axis=-1)
