"""The training forward of a whole sequence from position 0, without caches.

It computes what `Model.__call__` with a "float" cache computes, laid out for autograd on the
CPU: no ring buffer or encoding (window keys are the sequence's own rows); each layer's
attention is one softmax over banded window scores, the compressed entries it sees and the
sink, its products in numpy; a CSA layer's indexer scores every query against every entry at
once in numpy under the causal visibility mask and takes one top-k, a mask over the entries
(no blocked merge, no evaluation inside the graph); the vocabulary head's backward reuses its
forward's probabilities. Per-token pieces (projections, mHC, MoE) are the modules' own, their
linear products in numpy too (`numpy_products`).
"""

from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import CompressorState
from ..hc import collapse, expand, split_options
from ..kvcodec import IndexCodec, KVCodec
from ..layers import GatheredLinear, GroupedLinear
from ..model import Block, Model

_blas_controller = []


def one_blas_thread():
    """numpy's BLAS on one thread within the block. With the cores busy (a training run shares
    them), OpenBLAS threads waiting on each other made single products of the head 100x slower
    (2.5 s instead of 0.004 s for [2, 129280] x [129280, 64]), at random. The libraries are
    found once: finding them again on every call cost more than a step's small products."""
    if not _blas_controller:
        from threadpoolctl import ThreadpoolController

        _blas_controller.append(ThreadpoolController())
    return _blas_controller[0].limit(limits=1, user_api="blas")


# MLX's CPU backend (0.32, Linux) runs float32 products 14-30x slower than numpy's BLAS on one
# thread, exp 20-31x and a softmax 2x slower than numpy (benchmarks/train_step.py --ops): the
# training path's products and its attention softmax go through numpy, joined to autograd by
# custom VJPs. False runs them in MLX (the baseline of benchmarks/train_step.py --kernels).
NUMPY_KERNELS = True


QUERY_BLOCK = 128  # queries per attention block (more when the window is longer)


def block_size(window: int) -> int:
    """Queries per block of `_banded` for a sliding window of `window` rows."""
    return max(QUERY_BLOCK, window - 1)


def window_slot(positions, query, block: int):
    """Where `_banded`'s probabilities of `query` (blocks of `block` queries) hold the key at
    `positions`: the index among the first 2 * block, its window slots."""
    return positions - (query // block) * block + block


# MLX's CPU backend runs these float32 products several times slower than numpy's BLAS on one
# thread: the attention's score and value products go through numpy, joined by a custom VJP.
@mx.custom_function
def matmul(a, b):
    """a @ b for a [..., m, k] and b [..., k, n] with the same leading dimensions."""
    a, b = np.array(a), np.array(b)
    with one_blas_thread():
        return mx.array(np.matmul(a, b))


@matmul.vjp
def _matmul_vjp(primals, cotangent, output):
    a, b = (np.array(x) for x in primals)
    g = np.array(cotangent)
    with one_blas_thread():
        return mx.array(np.matmul(g, np.swapaxes(b, -1, -2))), mx.array(np.matmul(np.swapaxes(a, -1, -2), g))


@mx.custom_function
def linear(x, w):
    """x [..., in] @ w.T for w [out, in]."""
    a, b = np.array(x), np.array(w)
    with one_blas_thread():
        return mx.array((a.reshape(-1, a.shape[-1]) @ b.T).reshape(*a.shape[:-1], b.shape[0]))


@linear.vjp
def _linear_vjp(primals, cotangent, output):
    a, b = (np.array(x) for x in primals)
    g = np.array(cotangent).reshape(-1, b.shape[0])
    with one_blas_thread():
        return mx.array((g @ b).reshape(a.shape)), mx.array(g.T @ a.reshape(-1, b.shape[1]))


def _expert_rows(indices: np.ndarray, n_experts: int):
    """(expert, slice of its rows) for each expert with rows, for indices sorted by expert."""
    if np.any(indices[1:] < indices[:-1]):
        raise ValueError("expert indices must be sorted")
    bounds = np.searchsorted(indices, np.arange(n_experts + 1))
    return [(e, slice(bounds[e], bounds[e + 1])) for e in range(n_experts) if bounds[e + 1] > bounds[e]]


@mx.custom_function
def sorted_expert_linear(x, w, indices):
    """Row i of x [N, ..., in] times expert indices[i]'s w [E, out, in] transposed, for indices
    [N] sorted (as `RoutedExperts` sorts them): one product per expert, over its rows."""
    a, b, idx = np.array(x), np.array(w), np.array(indices)
    rows = a.reshape(len(idx), -1)
    y = np.zeros((len(idx), b.shape[1]), np.float32)
    with one_blas_thread():
        for e, part in _expert_rows(idx, b.shape[0]):
            y[part] = rows[part] @ b[e].T
    return mx.array(y.reshape(*a.shape[:-1], b.shape[1]))


@sorted_expert_linear.vjp
def _sorted_expert_linear_vjp(primals, cotangent, output):
    a, b, idx = (np.array(x) for x in primals)
    rows, g = a.reshape(len(idx), -1), np.array(cotangent).reshape(len(idx), -1)
    grad_rows, grad_w = np.zeros_like(rows), np.zeros_like(b)
    with one_blas_thread():
        for e, part in _expert_rows(idx, b.shape[0]):
            grad_rows[part] = g[part] @ b[e]
            grad_w[e] = g[part].T @ rows[part]
    return mx.array(grad_rows.reshape(a.shape)), mx.array(grad_w), mx.zeros_like(primals[2])


class NumpyLinear(nn.Linear):
    """nn.Linear (no bias) with its float32 product in numpy."""

    def __call__(self, x):
        if x.dtype != mx.float32 or self["weight"].dtype != mx.float32:
            return super().__call__(x)
        return linear(x, self["weight"])


class NumpyGroupedLinear(GroupedLinear):
    """GroupedLinear with one float32 numpy product per group."""

    def __call__(self, x, indices, sorted_indices=False):
        w = self["weight"]  # [G, out, in]; x [..., G, 1, in]
        if x.dtype != mx.float32 or w.dtype != mx.float32:
            return super().__call__(x, indices, sorted_indices)
        G, lead = w.shape[0], x.shape[:-3]
        groups = x.reshape(-1, G, x.shape[-1])
        out = mx.stack([linear(groups[:, g], w[g]) for g in range(G)], axis=1)
        return out.reshape(*lead, G, 1, w.shape[1])


class NumpyGatheredLinear(GatheredLinear):
    """GatheredLinear with one numpy product per expert when the rows come sorted by expert."""

    def __call__(self, x, indices, sorted_indices=False):
        w = self["weight"]
        if sorted_indices and indices.ndim == 1 and w.dtype == mx.float32 and x.dtype == mx.float32:
            return sorted_expert_linear(x, w, indices)
        return super().__call__(x, indices, sorted_indices)


_NUMPY_CLASSES = {nn.Linear: NumpyLinear, GroupedLinear: NumpyGroupedLinear, GatheredLinear: NumpyGatheredLinear}


def numpy_products(module: nn.Module, enabled: bool = True) -> int:
    """Runs the products of `module`'s unquantised, bias-free linear layers (plain, grouped and
    gathered) in numpy (enabled) or back in MLX; the weights stay where they are. Returns how
    many layers it switched."""
    switch = _NUMPY_CLASSES if enabled else {v: k for k, v in _NUMPY_CLASSES.items()}
    count = 0
    for _, layer in module.named_modules():
        target = switch.get(type(layer))
        if target is not None and "bias" not in layer:
            layer.__class__ = target
            count += 1
    return count


def _masked_softmax_numpy(logits: np.ndarray, mask) -> np.ndarray:
    z = np.where(mask, logits, -np.inf).astype(np.float32)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


@mx.custom_function
def masked_softmax(logits, mask):
    """softmax(where(mask, logits, -inf)) over the last axis (mask: boolean, broadcasting to
    logits, with at least one True per row)."""
    return mx.array(_masked_softmax_numpy(np.array(logits), np.array(mask)))


@masked_softmax.vjp
def _masked_softmax_vjp(primals, cotangent, output):
    p, g = np.array(output), np.array(cotangent)
    grad = p * (g - (g * p).sum(axis=-1, keepdims=True))
    return mx.array(grad), mx.zeros_like(primals[1])


def _banded(attn, q: mx.array, kv: mx.array, entries: Optional[mx.array], seen_entries,
            keep: Optional[dict] = None) -> mx.array:
    """Attention [B, L, H, hd] of q [B, L, H, hd] over each query's window of kv [B, L, hd] and the
    entries [B, T, hd] it attends to (seen_entries: boolean [B or 1, L, T]), with the sink; `keep`
    receives the probabilities "probs" [B, L, H, 2b + T + 1] and the block size "block" (b).

    Queries go in blocks of b = `block_size(window)`; block i's keys are the rows of blocks i - 1 and i (zeros
    before the sequence, masked). The heads share one kv head, so each block's scores are one
    [b * H, hd] x [hd, 2b] product. Each CSA query's top-k picks are a mask over all entries,
    which costs less here than gathering them per query."""
    B, L, H, hd = q.shape
    b = block_size(attn.window)
    n = -(-L // b)
    pad = n * b - L
    rows = mx.concatenate([mx.zeros((B, b, hd), kv.dtype), kv, mx.zeros((B, pad, hd), kv.dtype)], axis=1)
    rows = rows.reshape(B, n + 1, b, hd)
    win = mx.concatenate([rows[:, :-1], rows[:, 1:]], axis=2)  # [B, n, 2b, hd]
    qb = mx.concatenate([q, mx.zeros((B, pad, H, hd), q.dtype)], axis=1).reshape(B, n, b * H, hd)
    s = (matmul(qb, mx.contiguous(win.swapaxes(-1, -2))) * attn.scale).reshape(B, n * b, H, 2 * b)[:, :L]
    q_pos = np.arange(n * b).reshape(n, b, 1)
    k_pos = np.arange(n)[:, None, None] * b + np.arange(2 * b)[None, None, :] - b
    delta = q_pos - k_pos
    seen = ((delta >= 0) & (delta < attn.window) & (k_pos >= 0)).reshape(n * b, 1, 2 * b)[:L]
    parts, masks = [s], [np.broadcast_to(seen[None], (B, L, 1, 2 * b))]
    if entries is not None:
        T = entries.shape[1]
        s_ent = (matmul(q.reshape(B, L * H, hd), mx.contiguous(entries.swapaxes(-1, -2))) * attn.scale)
        parts.append(s_ent.reshape(B, L, H, T))
        masks.append(np.broadcast_to(np.asarray(seen_entries)[:, :, None, :], (B, L, 1, T)))
    parts.append(mx.broadcast_to(attn.attn_sink.astype(s.dtype)[:, None], (B, L, H, 1)))
    masks.append(np.ones((B, L, 1, 1), bool))
    logits, mask = mx.concatenate(parts, axis=-1), np.concatenate(masks, axis=-1)
    if NUMPY_KERNELS:
        probs = masked_softmax(logits, mx.array(mask)).astype(q.dtype)
    else:
        probs = mx.softmax(mx.where(mx.array(mask), logits, -mx.inf), axis=-1, precise=True).astype(q.dtype)
    if keep is not None:
        keep.update(probs=probs, block=b)
    p_win = mx.concatenate([probs[..., : 2 * b], mx.zeros((B, pad, H, 2 * b), probs.dtype)], axis=1)
    out = matmul(p_win.reshape(B, n, b * H, 2 * b), win).reshape(B, n * b, H, hd)[:, :L]
    if entries is not None:
        out = out + matmul(mx.contiguous(probs[..., 2 * b : -1]).reshape(B, L * H, -1), entries).reshape(B, L, H, hd)
    return out


def _entries(compressor, x: mx.array, rope, codec) -> Optional[mx.array]:
    """The compressed entries [B, T, d] of x [B, L, D] read from position 0 (None when L < ratio)."""
    state = CompressorState(codec)
    compressor(x, state, rope)
    return state.entries()


def index_scores(iq: mx.array, iw: mx.array, keys: mx.array) -> np.ndarray:
    """The lightning indexer's scores [B, L, T] (numpy, no gradient): iq [B, L, H, d], iw [B, L, H],
    keys [B, T, d]. Computed with numpy's BLAS: MLX's CPU matmul is several times slower here."""
    iq, iw, keys = np.array(iq), np.array(iw), np.array(keys.astype(mx.float32))
    with one_blas_thread():
        s = np.matmul(iq, np.swapaxes(keys, -1, -2)[:, None])  # [B, L, H, T]
        np.maximum(s, 0, out=s)
        return np.matmul(iw[:, :, None], s)[:, :, 0]


def top_k(scores: np.ndarray, visible: np.ndarray, k: int) -> np.ndarray:
    """Indices [B, L, min(k, T)] of each query's k highest-scoring visible entries (scores
    [B, L, T], visible boolean broadcasting to it); where fewer are visible, all of them and
    invisible ones."""
    masked = np.where(visible, scores, -np.inf)
    k = min(k, scores.shape[-1])
    return np.argpartition(-masked, k - 1, axis=-1)[..., :k]


def top_k_mask(scores: np.ndarray, visible: np.ndarray, k: int) -> np.ndarray:
    """Boolean [B, L, T]: the visible entries `top_k` picks."""
    chosen = np.zeros(scores.shape, bool)
    np.put_along_axis(chosen, top_k(scores, visible, k), True, axis=-1)
    return chosen & visible


def attention(attn, x: mx.array, record: Optional[dict] = None, probs: bool = False) -> mx.array:
    """Attention.__call__ of x [B, L, D] from position 0 on an empty "float" cache, [B, L, D].

    record (CSA layers): receives the attention queries "q", the indexer's queries "iq" and head
    weights "iw" (computed from inputs with their gradient stopped, so that the indexer's
    objective moves the indexer only), the entries "entries" and the indexer keys "keys"; with
    `probs`, also the attention probabilities (see `_banded`), the heads' outputs "heads"
    [B, L, H, hd] before the output projection and the shared key-value rows "kv" [B, L, hd]."""
    B, L, _ = x.shape
    q_lora, q, kv = attn._project(x, 0)  # q [B, L, H, hd]
    entries = seen = None
    if attn.ratio:
        kv_codec = KVCodec("float", attn.head_dim, attn.args.qk_rope_head_dim, x.dtype)
        entries = _entries(attn.compressor, x, attn.rope, kv_codec)
    if entries is not None:
        T = entries.shape[1]
        seen = (np.arange(T)[None, :] < ((np.arange(L) + 1) // attn.ratio)[:, None])[None]  # [1, L, T]
    if entries is not None and attn.ratio == 4:
        indexer = attn.indexer
        index_codec = IndexCodec("float", indexer.head_dim, x.dtype)
        keys = _entries(indexer.compressor, x, attn.rope, index_codec)
        if record is not None:
            iq, iw = indexer.queries(mx.stop_gradient(x), mx.stop_gradient(q_lora), attn.rope, 0, index_codec)
            record.update(q=q, iq=iq, iw=iw, entries=entries, keys=keys)
        else:
            iq, iw = indexer.queries(x, q_lora, attn.rope, 0, index_codec)
        seen = top_k_mask(index_scores(iq, iw, keys), seen, indexer.topk)
    heads = _banded(attn, q, kv, entries, seen, record if probs else None)
    if probs:
        record.update(heads=heads, kv=kv)
    return attn._output(heads, 0)


def block(layer: Block, h: mx.array, tokens: mx.array, record: Optional[dict] = None, probs: bool = False) -> mx.array:
    """Block.__call__ from position 0 on an empty "float" cache."""
    a = layer.args
    opts = split_options(a)
    x, post, comb = layer._attn_input(h, opts)
    if record is not None:
        record["x"] = x
    out = attention(layer.attn, x, record, probs)
    return layer._ffn(out, h, post, comb, tokens, opts)


def trunk(model: Model, tokens: mx.array, records: Dict[int, dict], probs_of=()):
    """(normed final features [B, L, D], last hc streams); `records` gets each CSA layer's
    record (see `attention`, and the layer's attention input "x") under its index, and the
    attention probabilities of the layers in `probs_of`."""
    a = model.args
    x = model.embed(tokens)
    h = expand(x, a.hc_mult)
    for i, layer in enumerate(model.layers):
        keep = i in probs_of
        record = records.setdefault(i, {}) if layer.attn.ratio == 4 or keep else None
        h = block(layer, h, tokens, record, keep)
    x = collapse(h, model, a)
    return model.norm(x), h


def mtp_features(mtp, hidden: mx.array, next_tokens: mx.array, embed) -> mx.array:
    """The MTP layer's normed features [B, L, D] for token i + 2 (as trainer.mtp_features)."""
    a = mtp.args
    e = mtp.e_proj(mtp.enorm(embed(next_tokens)))
    h = e[:, :, None, :] + mtp.h_proj(mtp.hnorm(hidden.astype(e.dtype)))
    h = block(mtp, h, next_tokens)
    x = collapse(h, mtp, a)
    return mtp.norm(x)


# -- the vocabulary head ---------------------------------------------------------------------------

# (feats, targets, probabilities) of the latest forwards, newest last, for their backward to reuse:
# recomputing the [N, vocab] softmax costs as much as the rest of the head's backward.
_saved_probs = []
_SAVED_MAX = 3  # a step's heads (main, MTP, copy output); a forward without backward leaves no more


def _head_probs(w: np.ndarray, feats: np.ndarray) -> np.ndarray:
    p = feats @ w.T
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    return p


@mx.custom_function
def head_cross_entropy(feats, weight, targets):
    """trainer.head_cross_entropy, keeping the forward's probabilities for the backward."""
    f, t = np.array(feats), np.array(targets)
    if not len(t):
        return mx.array(0.0, dtype=mx.float32)
    with one_blas_thread():
        p = _head_probs(np.array(weight), f)
    loss = -np.log(np.maximum(p[np.arange(len(t)), t], 1e-30)).mean()
    _saved_probs.append((f, t, p))
    del _saved_probs[:-_SAVED_MAX]
    return mx.array(loss, dtype=mx.float32)


@head_cross_entropy.vjp
def _head_cross_entropy_vjp(primals, cotangent, output):
    feats, weight, targets = primals
    w, f, t = np.array(weight), np.array(feats), np.array(targets)
    p = None
    for i in range(len(_saved_probs) - 1, -1, -1):
        saved_f, saved_t, saved_p = _saved_probs[i]
        if saved_f.shape == f.shape and np.array_equal(saved_t, t) and np.array_equal(saved_f, f):
            p = saved_p
            del _saved_probs[i]
            break
    with one_blas_thread():
        if p is None:
            p = _head_probs(w, f) if len(t) else np.zeros((0, w.shape[0]), np.float32)
        p[np.arange(len(t)), t] -= 1.0
        p *= float(cotangent.item()) / max(1, len(t))
        return mx.array(p @ w), mx.array((f.T @ p).T), mx.zeros_like(targets)
