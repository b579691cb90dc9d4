"""Manifold-constrained hyper-connections (mHC): hc residual streams per token.

Each sublayer reads a weighted sum of the streams (pre), writes its output back
scaled per stream (post), and mixes the old streams through a doubly-stochastic
matrix (comb, projected with Sinkhorn iterations). All of it runs in float32.
"""

from functools import lru_cache

import mlx.core as mx


def _mixes(streams: mx.array, fn: mx.array, norm_eps: float) -> mx.array:
    flat = streams.reshape(*streams.shape[:-2], -1).astype(mx.float32)
    flat = mx.fast.rms_norm(flat, None, norm_eps)
    return flat @ fn.astype(mx.float32).T


def _sinkhorn(comb: mx.array, iters: int, eps: float) -> mx.array:
    comb = mx.softmax(comb, axis=-1, precise=True) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


def hc_split(streams, fn, base, scale, *, iters: int, eps: float, norm_eps: float):
    """streams [B, L, hc, D] -> (sublayer input [B, L, D], post [B, L, hc], comb [B, L, hc, hc])."""
    return _compiled_split(iters, eps, norm_eps)(streams, fn, base, scale)


@lru_cache(maxsize=None)
def _compiled_split(iters: int, eps: float, norm_eps: float):
    # ~100 tiny ops (Sinkhorn iterations): fusing them matters more than the matmul in decoding
    return mx.compile(lambda streams, fn, base, scale: _split(streams, fn, base, scale, iters, eps, norm_eps))


def _split(streams, fn, base, scale, iters, eps, norm_eps):
    hc = streams.shape[-2]
    mixes = _mixes(streams, fn, norm_eps)
    base = base.astype(mx.float32)
    scale = scale.astype(mx.float32)
    pre = mx.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * mx.sigmoid(mixes[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    comb = mixes[..., 2 * hc :] * scale[2] + base[2 * hc :]
    comb = _sinkhorn(comb.reshape(*comb.shape[:-1], hc, hc), iters, eps)
    collapsed = (pre[..., None] * streams).sum(axis=-2).astype(streams.dtype)
    return collapsed, post, comb


def hc_merge(out: mx.array, streams: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """New stream k = post_k * out + sum_j comb[j, k] * stream_j."""
    dtype = streams.dtype
    mixed = comb.astype(dtype).swapaxes(-1, -2) @ streams
    return post.astype(dtype)[..., None] * out[..., None, :] + mixed


def hc_head(streams, fn, base, scale, *, eps: float, norm_eps: float) -> mx.array:
    mixes = _mixes(streams, fn, norm_eps)
    pre = mx.sigmoid(mixes * scale.astype(mx.float32) + base.astype(mx.float32)) + eps
    return (pre[..., None] * streams).sum(axis=-2).astype(streams.dtype)


def split_options(args) -> dict:
    """hc_split's keyword options from a model config."""
    return dict(iters=args.hc_sinkhorn_iters, eps=args.hc_eps, norm_eps=args.rms_norm_eps)


def expand(x: mx.array, hc: int) -> mx.array:
    """Embeddings [B, L, D] as hc identical streams [B, L, hc, D]."""
    return mx.broadcast_to(x[:, :, None, :], (*x.shape[:2], hc, x.shape[-1]))


def collapse(streams: mx.array, owner, args) -> mx.array:
    """hc_head with the hc_head_fn, hc_head_base and hc_head_scale of ``owner`` (a model, an MTP layer)."""
    return hc_head(streams, owner.hc_head_fn, owner.hc_head_base, owner.hc_head_scale, eps=args.hc_eps,
                   norm_eps=args.rms_norm_eps)
