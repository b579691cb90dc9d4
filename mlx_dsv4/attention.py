"""V4 attention: MQA over a sliding window plus compressed entries.

Ratio 0: window only. Ratio 128 (HCA): window ++ every visible compressed
entry. Ratio 4 (CSA): window ++ the top-k entries picked by the lightning
indexer (gathered per query). One learned sink logit per head joins the
softmax denominator. Queries are processed in blocks of `QUERY_BLOCK`, so
no score matrix grows with the square of the prompt length.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from .layers import GroupedLinear, RMSNorm
from .paths import device_paths

from .cache import CompressorState, LayerCache
from .config import ModelArgs
from .kvcodec import IndexCodec
from .memory import DENSE_ENTRY_BLOCK, INDEX_ENTRY_BLOCK, QUERY_BLOCK
from .rope import Rope, inv_freq_for
from .spec import compressor_width, has_indexer
from .streams import on, parallel_streams, split_tokens


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one kv entry (ratio 4: overlapping windows)."""

    def __init__(self, dim: int, head_dim: int, ratio: int, eps: float):
        super().__init__()
        self.ratio = ratio
        self.head_dim = head_dim
        width = compressor_width(ratio, head_dim)
        self.overlap = width > head_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = mx.zeros((ratio, width))
        self.norm = RMSNorm(head_dim, eps=eps)

    def project(self, x: mx.array):
        """(kv, gate float32) of x [B, L, D], as ``__call__`` pools them."""
        return self.wkv(x), self.wgate(x).astype(mx.float32)

    def __call__(self, x: mx.array, state: CompressorState, rope: Rope, projected=None) -> None:
        """Feed x [B, L, D] (``projected``: its ``project`` when already computed); closed
        windows are appended to state as entries."""
        r = self.ratio
        kv, gate = projected if projected is not None else split_tokens(self.project, x)
        if state.pending_kv is not None:
            kv = mx.concatenate([state.pending_kv, kv], axis=1)
            gate = mx.concatenate([state.pending_gate, gate], axis=1)
        usable = (kv.shape[1] // r) * r
        state.pending_kv, state.pending_gate = kv[:, usable:], gate[:, usable:]
        if not usable:
            return
        B, n = kv.shape[0], usable // r
        kv = kv[:, :usable].reshape(B, n, r, -1)
        gate = gate[:, :usable].reshape(B, n, r, -1) + self.ape.astype(mx.float32)
        if self.overlap:
            kv, gate = self._overlap(kv, gate, state)
        weights = mx.softmax(gate, axis=2, precise=True).astype(kv.dtype)
        pooled = self.norm((kv * weights).sum(axis=2))
        state.append(rope(pooled, offset=state.n_entries, stride=r))

    def _overlap(self, kv, gate, state: CompressorState):
        """Entry w pools the Ca halves of window w-1 and the Cb halves of window w."""
        d = self.head_dim
        ca_kv, cb_kv = kv[..., :d], kv[..., d:]
        ca_gate, cb_gate = gate[..., :d], gate[..., d:]
        B, _, r, _ = ca_kv.shape
        if state.prev_kv is None:
            first_kv = mx.zeros((B, 1, r, d), dtype=kv.dtype)
            first_gate = mx.full((B, 1, r, d), -mx.inf, dtype=mx.float32)
        else:
            first_kv, first_gate = state.prev_kv[:, None], state.prev_gate[:, None]
        prev_kv = mx.concatenate([first_kv, ca_kv[:, :-1]], axis=1)
        prev_gate = mx.concatenate([first_gate, ca_gate[:, :-1]], axis=1)
        state.prev_kv, state.prev_gate = ca_kv[:, -1], ca_gate[:, -1]
        return mx.concatenate([prev_kv, cb_kv], axis=2), mx.concatenate([prev_gate, cb_gate], axis=2)


class Indexer(nn.Module):
    """Lightning indexer: scores compressed entries per query and keeps the top k."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.topk = args.index_topk
        self.entry_block = INDEX_ENTRY_BLOCK
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(args.hidden_size, self.head_dim, 4, args.rms_norm_eps)

    def queries(self, x, q_lora, rope: Rope, offset: int, codec: IndexCodec):
        """(queries [B, L, H, d] float32 as `codec` scores them, head weights [B, L, H] float32)."""
        B, L, _ = x.shape
        q = self.wq_b(q_lora).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = codec.queries(rope(q, offset=offset))
        w = self.weights_proj(x).astype(mx.float32) * (self.n_heads**-0.5 * self.head_dim**-0.5)
        return q.transpose(0, 2, 1, 3), w

    def select(self, q: mx.array, w: mx.array, keys: CompressorState, visible: mx.array,
               keys_t: Optional[mx.array] = None, n_entries: Optional[int] = None, decode_keys: bool = False):
        """Top-k entries per query: (indices [B, Lq, k], valid [B, Lq, k]).

        q [B, H, Lq, d], w [B, Lq, H], keys: the indexer's entries, visible [Lq, 1] entries each
        query may see; keys_t: those entries decoded, float32 [B, d, T]; n_entries: score only
        the first this many; decode_keys: decode the keys of each entry block as it is scored
        (see `Attention`).
        """
        T = keys_t.shape[-1] if keys_t is not None else keys.n_entries if n_entries is None else n_entries
        head_w = w.transpose(0, 2, 1)[..., None]

        def entry_scores(e0: int, e1: int) -> mx.array:  # [B, Lq, e1 - e0]
            if keys_t is not None:
                s = q @ keys_t[:, None, :, e0:e1]
            elif decode_keys:
                # Laid out [d, entries], the operand layout the CPU backend's float32 matmul runs fastest with.
                s = q @ mx.contiguous(keys.entries(e0, e1).astype(mx.float32).swapaxes(-1, -2))[:, None]
            else:
                s = keys.scores(q, e0, e1)
            s = (nn.relu(s) * head_w).sum(axis=1)
            return mx.where(mx.arange(e0, e1) < visible, s, -mx.inf)

        # The bound is on a block's scores, Lq x entries: fewer queries (decoding) score more entries at a time.
        block = self.entry_block * max(1, QUERY_BLOCK // q.shape[2])
        # The top-k choice has no gradient; the indexer learns from its own objective instead.
        indices = mx.stop_gradient(blocked_top_k(entry_scores, T, self.topk, block))
        return indices, indices < visible


def blocked_top_k(entry_scores, n_entries: int, k: int, block: int) -> mx.array:
    """Indices [..., min(k, n_entries)] of the largest scores, in no particular order.

    entry_scores(e0, e1) gives the scores of entries e0..e1 [..., e1 - e0]; they are asked for
    `block` entries at a time and merged into a running top k, so at most k + block scores per
    row are live at once. The set picked equals one top k over all scores whenever the k-th and
    (k+1)-th largest differ; among scores tied there, neither this nor one argpartition over all
    entries promises which are kept.
    """
    if n_entries <= block:
        scores = entry_scores(0, n_entries)
        k = min(k, n_entries)
        return mx.argpartition(-scores, k - 1, axis=-1)[..., :k]
    top_scores = top_indices = None
    for e0 in range(0, n_entries, block):
        e1 = min(n_entries, e0 + block)
        scores = entry_scores(e0, e1)
        indices = mx.broadcast_to(mx.arange(e0, e1, dtype=mx.uint32), scores.shape)
        if top_scores is not None:
            scores = mx.concatenate([top_scores, scores], axis=-1)
            indices = mx.concatenate([top_indices, indices], axis=-1)
        if scores.shape[-1] > k:
            keep = mx.argpartition(-scores, k - 1, axis=-1)[..., :k]
            scores = mx.take_along_axis(scores, keep, axis=-1)
            indices = mx.take_along_axis(indices, keep, axis=-1)
        top_scores, top_indices = scores, indices
        # Left lazy, the scores of several blocks are computed before any merge and live at once.
        mx.eval(top_scores, top_indices)
    return top_indices


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.args = args
        self.ratio = args.compress_ratios[layer_id]
        self.n_heads = args.num_attention_heads
        self.head_dim = args.head_dim
        self.eps = args.rms_norm_eps
        self.window = args.sliding_window
        self.scale = args.head_dim**-0.5
        dim, hd, H, G = args.hidden_size, args.head_dim, args.num_attention_heads, args.o_groups
        self.wq_a = nn.Linear(dim, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, eps=self.eps)
        self.wq_b = nn.Linear(args.q_lora_rank, H * hd, bias=False)
        self.wkv = nn.Linear(dim, hd, bias=False)
        self.kv_norm = RMSNorm(hd, eps=self.eps)
        self.wo_a = GroupedLinear(H * hd // G, args.o_lora_rank, G, bias=False)
        self.wo_b = nn.Linear(G * args.o_lora_rank, dim, bias=False)
        self.attn_sink = mx.zeros((H,))
        if self.ratio:
            self.compressor = Compressor(dim, hd, self.ratio, self.eps)
        if has_indexer(self.ratio):
            self.indexer = Indexer(args)
        self.rope = Rope(inv_freq_for(args, compressed=self.ratio > 0))

    def __call__(self, x: mx.array, cache: LayerCache, query_block: Optional[int] = QUERY_BLOCK) -> mx.array:
        start = cache.offset
        q_lora, q, kv = split_tokens(lambda first, x: self._project(x, start + first), x, pass_first=True)
        out = self.attend(x, q_lora, q, kv, cache, query_block)
        return split_tokens(lambda first, out: self._output(out, start + first), out, pass_first=True)

    def attend(self, x: mx.array, q_lora: mx.array, q: mx.array, kv: mx.array, cache: LayerCache,
               query_block: Optional[int] = QUERY_BLOCK, projected: Optional[dict] = None) -> mx.array:
        """Attention output [B, L, H, hd] (RoPE still applied) of this step's projections (see
        ``_project``) against ``cache``, which takes this step's rows. ``projected``: those of the
        compressors and the indexer queries when already computed (see ``side_projections``)."""
        B, L, _ = x.shape
        start = cache.offset
        q = q.transpose(0, 2, 1, 3)  # [B, H, L, hd]
        keys, first = cache.window_keys(kv)
        projected = projected or {}

        entries = index_q = index_w = None
        if self.ratio:
            self.compressor(x, cache.compressor, self.rope, projected.get("compressor"))
            if self.ratio == 4:
                self.indexer.compressor(x, cache.indexer, self.rope, projected.get("index_compressor"))
                if cache.indexer.n_entries and "index_queries" in projected:
                    index_q, index_w = projected["index_queries"]
                    index_q = index_q.transpose(0, 2, 1, 3)
                elif cache.indexer.n_entries:
                    index_q, index_w = split_tokens(
                        lambda first, x, q_lora: self.indexer.queries(x, q_lora, self.rope, start + first,
                                                                   cache.indexer.codec),
                        x, q_lora, pass_first=True)
                    index_q = index_q.transpose(0, 2, 1, 3)
            elif cache.compressor.n_entries:
                entries = cache.compressor.entries()

        # A query block picks up to block * top-k entries: when that is more than the entries
        # there are, decoding all of them once is cheaper than decoding each query's picks, and
        # holds no more. Beyond, each block decodes its picks, so no step decodes every entry of
        # a long context at once.
        decoded = None
        if index_q is not None and L > 1:
            if cache.compressor.n_entries <= min(L, query_block or L) * self.indexer.topk:
                decoded = cache.compressor.entries()

        sinks = self.attn_sink.astype(mx.float32)
        blocks = []
        step = query_block or L
        if entries is not None and query_block:
            # Every query of a dense (HCA) layer scores all its entries: fewer queries at a time
            # beyond DENSE_ENTRY_BLOCK entries keep a block's scores bounded at any context.
            step = max(1, step * DENSE_ENTRY_BLOCK // max(DENSE_ENTRY_BLOCK, entries.shape[1]))
        streams = parallel_streams() if L > step else (None,)
        starts = list(range(0, L, step))
        for i, q0 in enumerate(starts):
            with on(streams[i % len(streams)]):
                blocks.append(self._block(q, q0, min(L, q0 + step), start, keys, first, entries,
                                          index_q, index_w, L > 1, decoded, cache, sinks))
            bounded = index_q is not None or step < (query_block or L)
            if bounded and L > step and (i % len(streams) == len(streams) - 1 or i == len(starts) - 1):
                # Finish these blocks before building more: evaluated lazily, every block's
                # gathered entries ([block, top-k, head_dim]) could be live at once. Measured at
                # the reduced bench widths (bf16, CSA + HCA layer, top-512, one stream), peak MLX
                # memory of a chunk after a 2048-token one: 129 MiB with this, 151 without for
                # 2048 tokens; 471 vs 607 MiB for 8192; no slower. Other layers gather nothing.
                mx.eval(blocks[-len(streams):])
        out = blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=2)
        cache.offset += L
        return out.transpose(0, 2, 1, 3)  # [B, L, H, hd]

    def side_projections(self, x: mx.array, q_lora: mx.array, offset, index_codec: Optional[IndexCodec]) -> dict:
        """The compressors' projections of x and the indexer queries (at ``offset``, as in
        ``_project``), for ``attend`` to use instead of computing them itself."""
        out = {}
        if self.ratio:
            out["compressor"] = self.compressor.project(x)
        if self.ratio == 4:
            out["index_compressor"] = self.indexer.compressor.project(x)
            out["index_queries"] = self.indexer.queries(x, q_lora, self.rope, offset, index_codec)
        return out

    def _project(self, x, offset):
        """Per-token projections: (q_lora [B, L, r], queries [B, L, H, hd], kv rows [B, L, hd]);
        ``offset``: the position of x[:, 0], or one per row (an array [B])."""
        B, L, _ = x.shape
        q_lora = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lora).reshape(B, L, self.n_heads, self.head_dim)
        q = self.rope(mx.fast.rms_norm(q, None, self.eps).transpose(0, 2, 1, 3), offset=offset)
        kv = self.rope(self.kv_norm(self.wkv(x)), offset=offset)
        return q_lora, q.transpose(0, 2, 1, 3), kv

    def _output(self, out, offset):
        """Attention output [B, L, H, hd] -> [B, L, dim]: RoPE undone, grouped projection;
        ``offset`` as in ``_project``."""
        B, L, H, hd = out.shape
        out = self.rope(out.transpose(0, 2, 1, 3), offset=offset, inverse=True).transpose(0, 2, 1, 3)
        G = self.args.o_groups
        out = self.wo_a(out.reshape(B, L, G, 1, H * hd // G), mx.arange(G)).reshape(B, L, -1)
        return self.wo_b(out)

    def _block(self, q, q0, q1, start, keys, first, entries, index_q, index_w, decode_keys, decoded, cache, sinks):
        """Attention output [B, H, q1 - q0, hd] for queries q0..q1 of this step."""
        B = q.shape[0]
        q_pos = start + mx.arange(q0, q1)
        k0 = max(0, start + q0 - self.window + 1 - first)
        k1 = start + q1 - first
        win = keys[:, k0:k1]
        delta = q_pos[:, None] - (first + k0 + mx.arange(k1 - k0))[None, :]
        mask = (delta >= 0) & (delta < self.window)
        visible = ((q_pos + 1) // self.ratio)[:, None] if self.ratio else None
        qb = q[:, :, q0:q1]
        if entries is not None:
            win = mx.concatenate([win, entries], axis=1)
            mask = mx.concatenate([mask, mx.arange(entries.shape[1]) < visible], axis=1)
        if index_q is None:
            return self._sdpa(qb, win, mask, sinks)
        # no query of the block sees past entry (start + q1) // ratio
        n_entries = min(cache.indexer.n_entries, (start + q1) // self.ratio)
        indices, valid = self.indexer.select(index_q[:, :, q0:q1], index_w[:, q0:q1], cache.indexer, visible,
                                             n_entries=n_entries, decode_keys=decode_keys)
        if decoded is None:
            picked = cache.compressor.gather(indices)  # [B, Lq, k, hd]
        else:
            picked = decoded[mx.arange(B)[:, None, None], indices]
        if q1 - q0 == 1:  # one query: its picked entries are ordinary keys
            keys = mx.concatenate([win, picked[:, 0]], axis=1)
            mask = mx.concatenate([mx.broadcast_to(mask, (B, 1, mask.shape[1])), valid], axis=2)[:, None]
            return self._sdpa(qb, keys, mask, sinks)
        return self._sparse(qb, win, mask, picked, valid, sinks)

    def _sdpa(self, q, keys, mask, sinks):
        B, H, Lq, hd = q.shape
        k = keys[:, None]
        if Lq > 1 or device_paths().decode_attention == "sdpa":
            return mx.fast.scaled_dot_product_attention(q, k, k, scale=self.scale, mask=mask, sinks=sinks.astype(q.dtype))
        # One query, "matmul" path: the heads share one kv head, so score all of them
        # with a single [H, hd] x [hd, T] product.
        s = (q.reshape(B, 1, H, hd) @ k.swapaxes(-1, -2)).astype(mx.float32) * self.scale  # [B, 1, H, T]
        s = mx.where(mask.reshape(-1, 1, 1, mask.shape[-1]), s, -mx.inf)
        s = mx.concatenate([s, mx.broadcast_to(sinks.reshape(1, 1, H, 1), (B, 1, H, 1))], axis=-1)
        p = mx.softmax(s, axis=-1, precise=True)[..., :-1].astype(q.dtype)
        return (p @ k).reshape(B, H, 1, hd)

    def _sparse(self, q, win, mask, picked, valid, sinks):
        """Attention over window keys shared by the block plus per-query gathered entries."""
        B, H, Lq, _ = q.shape
        s_win = mx.where(mask, (q @ win[:, None].swapaxes(-1, -2)) * self.scale, -mx.inf)
        qt = q.transpose(0, 2, 1, 3)  # [B, Lq, H, hd]
        s_pick = (qt @ picked.swapaxes(-1, -2)).transpose(0, 2, 1, 3) * self.scale  # [B, H, Lq, k]
        s_pick = mx.where(valid[:, None], s_pick, -mx.inf)
        sink = mx.broadcast_to(sinks.astype(s_win.dtype)[None, :, None, None], (B, H, Lq, 1))
        probs = mx.softmax(mx.concatenate([s_win, s_pick, sink], axis=-1), axis=-1, precise=True).astype(q.dtype)
        n_win = win.shape[1]
        out = probs[..., :n_win] @ win[:, None]
        p_pick = probs[..., n_win:-1].transpose(0, 2, 1, 3)  # [B, Lq, H, k]
        return out + (p_pick @ picked).transpose(0, 2, 1, 3)
