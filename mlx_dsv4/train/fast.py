"""The training forward of a whole sequence from position 0, without caches.

It computes what `Model.__call__` with a "float" cache computes, differently laid out for
autograd on the CPU: each layer's attention is one masked product of every query against its
window keys and the compressed entries, instead of query blocks over a ring buffer; a CSA
layer's indexer scores every query against every entry at once under the causal visibility
mask, takes one top-k, and turns the picks into a mask over the entries rather than gathering
them per query. Per-token pieces (projections, mHC, MoE) are the modules' own.
"""

from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import CompressorState
from ..hc import hc_head
from ..kvcodec import IndexCodec, KVCodec
from ..model import Block, Model

WINDOW_BLOCK = 128  # queries per block of the banded window product


def _entries(compressor, x: mx.array, rope, codec) -> Optional[mx.array]:
    """The compressed entries [B, T, d] of x [B, L, D] read from position 0 (None when L < ratio)."""
    state = CompressorState(codec)
    compressor(x, state, rope)
    return state.entries()


def _window_scores(q: mx.array, kv: mx.array, window: int, scale: float):
    """Scores of queries q [B, L, H, hd] against the keys of their sliding windows, blocked by
    WINDOW_BLOCK queries: (scores [B, n, b, H, 2b] with -inf outside each window, keys [B, n, 2b, hd]).

    Block i's keys are the rows of blocks i - 1 and i (zeros before the sequence, masked). The heads
    share one kv head, so each block is one [b * H, hd] x [hd, 2b] product."""
    B, L, H, hd = q.shape
    b = WINDOW_BLOCK
    assert window <= b + 1, "a query's window must fit in its block and the one before"
    n = -(-L // b)
    pad = n * b - L
    rows = mx.concatenate([mx.zeros((B, b, hd), kv.dtype), kv, mx.zeros((B, pad, hd), kv.dtype)], axis=1)
    rows = rows.reshape(B, n + 1, b, hd)
    keys = mx.concatenate([rows[:, :-1], rows[:, 1:]], axis=2)  # [B, n, 2b, hd]
    qb = mx.concatenate([q, mx.zeros((B, pad, H, hd), q.dtype)], axis=1).reshape(B, n, b * H, hd)
    s = ((qb @ keys.swapaxes(-1, -2)) * scale).reshape(B, n, b, H, 2 * b)
    q_pos = mx.arange(n * b).reshape(n, b, 1, 1)
    k_pos = (mx.arange(n)[:, None] * b + mx.arange(2 * b)[None, :] - b)[:, None, None, :]  # [n, 1, 1, 2b]
    delta = q_pos - k_pos
    visible = (delta >= 0) & (delta < window) & (k_pos >= 0)
    return mx.where(visible, s, -mx.inf), keys


def index_scores(iq: mx.array, iw: mx.array, keys: mx.array) -> mx.array:
    """The lightning indexer's scores [B, L, T]: iq [B, L, H, d], iw [B, L, H], keys [B, T, d]."""
    s = iq.transpose(0, 2, 1, 3) @ keys.astype(mx.float32)[:, None].swapaxes(-1, -2)  # [B, H, L, T]
    return (nn.relu(s) * iw.transpose(0, 2, 1)[..., None]).sum(axis=1)


def top_k_mask(scores: mx.array, visible: mx.array, k: int) -> mx.array:
    """Boolean [B, L, T]: the k highest-scoring visible entries of each query (all of them when
    fewer are visible)."""
    masked = mx.where(visible, scores, -mx.inf)
    k = min(k, scores.shape[-1])
    picks = mx.argpartition(-masked, k - 1, axis=-1)[..., :k]
    chosen = mx.put_along_axis(mx.zeros(scores.shape, mx.bool_), picks, mx.array(True), axis=-1)
    return mx.stop_gradient(chosen & visible)


def attention(attn, x: mx.array, record: Optional[dict] = None) -> mx.array:
    """Attention.__call__ of x [B, L, D] from position 0 on an empty "float" cache, [B, L, D].

    record (CSA layers): receives the attention queries "q", the indexer's queries "iq" and head
    weights "iw" (computed from inputs with their gradient stopped, so that the indexer's
    objective moves the indexer only), the entries "entries" and the indexer keys "keys"."""
    B, L, _ = x.shape
    q_lora, q, kv = attn._project(x, 0)  # q [B, L, H, hd]
    H, hd = q.shape[2], q.shape[3]
    s_win, win = _window_scores(q, kv, attn.window, attn.scale)
    n, b = s_win.shape[1], s_win.shape[2]
    parts = [s_win.reshape(B, n * b, H, -1)[:, :L]]

    entries = None
    if attn.ratio:
        kv_codec = KVCodec("float", attn.head_dim, attn.args.qk_rope_head_dim, x.dtype)
        entries = _entries(attn.compressor, x, attn.rope, kv_codec)
    if entries is not None:
        T = entries.shape[1]
        visible = mx.arange(T)[None, :] < ((mx.arange(L) + 1) // attn.ratio)[:, None]  # [L, T]
        if attn.ratio == 4:
            indexer = attn.indexer
            index_codec = IndexCodec("float", indexer.head_dim, x.dtype)
            keys = _entries(indexer.compressor, x, attn.rope, index_codec)
            if record is not None:
                iq, iw = indexer.queries(mx.stop_gradient(x), mx.stop_gradient(q_lora), attn.rope, 0, index_codec)
                record.update(q=q, iq=iq, iw=iw, entries=entries, keys=keys)
            else:
                iq, iw = indexer.queries(x, q_lora, attn.rope, 0, index_codec)
            visible = top_k_mask(mx.stop_gradient(index_scores(iq, iw, keys)), visible, indexer.topk)
        s_ent = ((q.reshape(B, L * H, hd) @ entries.swapaxes(-1, -2)) * attn.scale).reshape(B, L, H, T)
        parts.append(mx.where(mx.expand_dims(visible, -2), s_ent, -mx.inf))
    sinks = mx.broadcast_to(attn.attn_sink.astype(parts[0].dtype)[:, None], (B, L, H, 1))
    probs = mx.softmax(mx.concatenate(parts + [sinks], axis=-1), axis=-1, precise=True).astype(q.dtype)
    n_win = parts[0].shape[-1]
    p_win = mx.concatenate([probs[..., :n_win], mx.zeros((B, n * b - L, H, n_win), probs.dtype)], axis=1)
    out = (p_win.reshape(B, n, b * H, n_win) @ win).reshape(B, n * b, H, hd)[:, :L]
    if entries is not None:
        out = out + (probs[..., n_win:-1].reshape(B, L * H, -1) @ entries).reshape(B, L, H, hd)
    return attn._output(out, 0)


def block(layer: Block, h: mx.array, tokens: mx.array, record: Optional[dict] = None) -> mx.array:
    """Block.__call__ from position 0 on an empty "float" cache."""
    a = layer.args
    opts = dict(iters=a.hc_sinkhorn_iters, eps=a.hc_eps, norm_eps=a.rms_norm_eps)
    x, post, comb = layer._attn_input(h, opts)
    out = attention(layer.attn, x, record)
    return layer._ffn(out, h, post, comb, tokens, opts)


def trunk(model: Model, tokens: mx.array, records: Dict[int, dict]):
    """(normed final features [B, L, D], last hc streams); `records` gets each CSA layer's
    record (see `attention`) under its index."""
    a = model.args
    x = model.embed(tokens)
    h = mx.broadcast_to(x[:, :, None, :], (*x.shape[:2], a.hc_mult, x.shape[-1]))
    for i, layer in enumerate(model.layers):
        record = records.setdefault(i, {}) if layer.attn.ratio == 4 else None
        h = block(layer, h, tokens, record)
    x = hc_head(h, model.hc_head_fn, model.hc_head_base, model.hc_head_scale, eps=a.hc_eps, norm_eps=a.rms_norm_eps)
    return model.norm(x), h


def mtp_features(mtp, hidden: mx.array, next_tokens: mx.array, embed) -> mx.array:
    """The MTP layer's normed features [B, L, D] for token i + 2 (as trainer.mtp_features)."""
    a = mtp.args
    e = mtp.e_proj(mtp.enorm(embed(next_tokens)))
    h = e[:, :, None, :] + mtp.h_proj(mtp.hnorm(hidden.astype(e.dtype)))
    h = block(mtp, h, next_tokens)
    x = hc_head(h, mtp.hc_head_fn, mtp.hc_head_base, mtp.hc_head_scale, eps=a.hc_eps, norm_eps=a.rms_norm_eps)
    return mtp.norm(x)
