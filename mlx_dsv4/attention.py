"""V4 attention: MQA over a sliding window plus compressed entries.

Ratio 0: window only. Ratio 128 (HCA): window ++ every visible compressed
entry. Ratio 4 (CSA): window ++ the top-k entries picked by the lightning
indexer. One learned sink logit per head joins the softmax denominator.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from .cache import CompressorState, LayerCache
from .config import ModelArgs
from .rope import RopeTable, apply_rope, inv_freq_for


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one kv entry (ratio 4: overlapping windows)."""

    def __init__(self, dim: int, head_dim: int, ratio: int, eps: float):
        super().__init__()
        self.ratio = ratio
        self.head_dim = head_dim
        self.overlap = ratio == 4
        width = head_dim * (2 if self.overlap else 1)
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = mx.zeros((ratio, width))
        self.norm = nn.RMSNorm(head_dim, eps=eps)

    def __call__(self, x: mx.array, state: CompressorState, rope: RopeTable) -> Optional[mx.array]:
        """Feed x [B, L, D]; return all entries so far [B, T, head_dim] (None if T == 0)."""
        r, d = self.ratio, self.head_dim
        kv = self.wkv(x)
        gate = self.wgate(x).astype(mx.float32)
        if state.pending_kv is not None:
            kv = mx.concatenate([state.pending_kv, kv], axis=1)
            gate = mx.concatenate([state.pending_gate, gate], axis=1)
        usable = (kv.shape[1] // r) * r
        state.pending_kv, state.pending_gate = kv[:, usable:], gate[:, usable:]
        if usable:
            B, n = kv.shape[0], usable // r
            kv = kv[:, :usable].reshape(B, n, r, -1)
            gate = gate[:, :usable].reshape(B, n, r, -1) + self.ape.astype(mx.float32)
            if self.overlap:
                kv, gate = self._overlap(kv, gate, state)
            weights = mx.softmax(gate, axis=2, precise=True).astype(kv.dtype)
            pooled = self.norm((kv * weights).sum(axis=2))
            positions = (state.n_entries + mx.arange(n)) * r
            cos, sin = rope(positions)
            state.append(apply_rope(pooled, cos, sin))
        return state.entries if state.n_entries else None

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
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(args.hidden_size, self.head_dim, 4, args.rms_norm_eps)

    def __call__(self, x, q_lora, cos, sin, visible, state: CompressorState, rope: RopeTable):
        """Return (indices [B, L, k], valid [B, L, k]) or None before any entry exists.

        visible [L, 1]: how many entries each query may see.
        """
        keys = self.compressor(x, state, rope)
        if keys is None:
            return None
        B, L, _ = x.shape
        T = keys.shape[1]
        q = self.wq_b(q_lora).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = apply_rope(q, cos, sin).astype(mx.float32)
        scores = nn.relu(q @ keys.astype(mx.float32)[:, None].swapaxes(-1, -2)) * self.head_dim**-0.5
        w = self.weights_proj(x).astype(mx.float32) * self.n_heads**-0.5  # [B, L, H]
        scores = (scores * w.transpose(0, 2, 1)[..., None]).sum(axis=1)  # [B, L, T]
        scores = mx.where(mx.arange(T) < visible, scores, -mx.inf)
        k = min(self.topk, T)
        indices = mx.argpartition(-scores, k - 1, axis=-1)[..., :k]
        return indices, indices < visible


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.args = args
        self.ratio = args.compress_ratios[layer_id]
        self.n_heads = args.num_attention_heads
        self.head_dim = args.head_dim
        self.eps = args.rms_norm_eps
        self.window = args.sliding_window
        dim, hd, H, G = args.hidden_size, args.head_dim, args.num_attention_heads, args.o_groups
        self.wq_a = nn.Linear(dim, args.q_lora_rank, bias=False)
        self.q_norm = nn.RMSNorm(args.q_lora_rank, eps=self.eps)
        self.wq_b = nn.Linear(args.q_lora_rank, H * hd, bias=False)
        self.wkv = nn.Linear(dim, hd, bias=False)
        self.kv_norm = nn.RMSNorm(hd, eps=self.eps)
        self.wo_a = SwitchLinear(H * hd // G, args.o_lora_rank, G, bias=False)
        self.wo_b = nn.Linear(G * args.o_lora_rank, dim, bias=False)
        self.attn_sink = mx.zeros((H,))
        if self.ratio:
            self.compressor = Compressor(dim, hd, self.ratio, self.eps)
        if self.ratio == 4:
            self.indexer = Indexer(args)
        self.rope = RopeTable(inv_freq_for(args, compressed=self.ratio > 0))

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        B, L, _ = x.shape
        H, hd = self.n_heads, self.head_dim
        start = cache.offset
        q_pos = start + mx.arange(L)
        cos, sin = self.rope(q_pos)

        q_lora = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lora).reshape(B, L, H, hd)
        q = mx.fast.rms_norm(q, None, self.eps).transpose(0, 2, 1, 3)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)

        keys, first = cache.update_window(kv)
        k_pos = first + mx.arange(keys.shape[1])
        delta = q_pos[:, None] - k_pos[None, :]
        in_window = (delta >= 0) & (delta < self.window)
        scale = hd**-0.5
        logits = [mx.where(in_window, (q @ keys[:, None].swapaxes(-1, -2)) * scale, -mx.inf)]
        values = [keys]

        if self.ratio:
            visible = ((q_pos + 1) // self.ratio)[:, None]
            entries = self.compressor(x, cache.compressor, self.rope)
            if self.ratio == 4:
                picked = None
                if entries is not None:
                    picked = self.indexer(x, q_lora, cos, sin, visible, cache.indexer, self.rope)
                else:
                    self.indexer.compressor(x, cache.indexer, self.rope)
                if picked is not None:
                    indices, valid = picked
                    gathered = entries[mx.arange(B)[:, None, None], indices]  # [B, L, k, hd]
                    s = (q[:, :, :, None, :] @ gathered[:, None].swapaxes(-1, -2)).squeeze(-2) * scale
                    logits.append(mx.where(valid[:, None], s, -mx.inf))
                    values.append(gathered)
            elif entries is not None:
                s = (q @ entries[:, None].swapaxes(-1, -2)) * scale
                logits.append(mx.where(mx.arange(entries.shape[1]) < visible, s, -mx.inf))
                values.append(entries)

        sink = mx.broadcast_to(self.attn_sink.astype(logits[0].dtype)[None, :, None, None], (B, H, L, 1))
        probs = mx.softmax(mx.concatenate(logits + [sink], axis=-1), axis=-1, precise=True)
        out = probs[..., : keys.shape[1]] @ keys[:, None]
        if len(values) > 1:
            p = probs[..., keys.shape[1] : -1]
            v = values[1]
            if v.ndim == 4:  # per-query gathered entries [B, L, k, hd]
                out = out + (p[..., None, :] @ v[:, None]).squeeze(-2)
            else:
                out = out + p @ v[:, None]
        cache.offset += L

        out = apply_rope(out, cos, sin, inverse=True).transpose(0, 2, 1, 3)  # [B, L, H, hd]
        G = self.args.o_groups
        grouped = out.reshape(B, L, G, 1, H * hd // G)
        out = self.wo_a(grouped, mx.arange(G)).reshape(B, L, -1)
        return self.wo_b(out)
