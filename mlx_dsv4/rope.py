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


class RopeTable:
    """cos/sin for arbitrary integer positions with one inverse-frequency set."""

    def __init__(self, inv_freq: mx.array):
        self.inv_freq = inv_freq

    def __call__(self, positions: mx.array):
        angles = positions.astype(mx.float32)[..., None] * self.inv_freq
        return mx.cos(angles), mx.sin(angles)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array, inverse: bool = False) -> mx.array:
    """Rotate pairs (2j, 2j+1) of the last 2*len(cos) dims of x.

    cos/sin have shape [..., L, rd/2] and broadcast against x[..., L, :]
    (insert head axes before calling).
    """
    rd = cos.shape[-1] * 2
    dtype = x.dtype
    nope, rope = x[..., :-rd], x[..., -rd:].astype(mx.float32)
    pairs = rope.reshape(*rope.shape[:-1], rd // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    rotated = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rope.shape)
    return mx.concatenate([nope, rotated.astype(dtype)], axis=-1)
