"""The DSpark drafter of V4-Flash-0731, used for speculative decoding in place of the MTP layer.

The checkpoint keeps it under mtp.<stage>.*. Stage 0 projects the decoder's tapped outputs
(the outputs of the `dspark_target_layer_ids` layers, each averaged over its hc streams,
concatenated) with `main_proj` and `main_norm`; that projection is the drafter's context.
Each stage is a V4 block (mHC, learned-routing MoE) whose attention reads, as keys and values,
the context rows of the last `sliding_window` positions (its own `wkv`/`kv_norm` over the shared
projection, kept in its cache) followed by the drafted block's own rows, with no mask: every
query of the block sees the whole block. The block is the anchor token (the last emitted one,
not yet run by the main model) followed by mask tokens (`dspark_noise_token_id`), at the
positions they will take; one pass gives a logits row per block position, and the last
stage's mHC head, norm and the main model's output head read it out. The drafts are then a
chain through the low-rank Markov head: draft i's logits are row i plus
markov_w2(markov_w1(draft i - 1)), the anchor standing for draft -1.

Only positions the main model has run and kept enter the context cache, so a rejected draft
leaves nothing to undo there.
"""

import copy
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .cache import LayerCache, ModelCache
from .config import ModelArgs
from .hc import collapse, expand, split_options
from .layers import RMSNorm
from .model import Block, layer_caches
from .streams import split_outputs


def _stage_args(args: ModelArgs) -> ModelArgs:
    """The args a stage's Block reads as layer 0: sliding window only, never hash-routed."""
    stage = copy.copy(args)
    stage.compress_ratios = [0]
    stage.num_hash_layers = 0
    return stage


class MarkovHead(nn.Module):
    """A low-rank correction of draft i's logits by the token drafted before it."""

    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    def __call__(self, logits: mx.array, previous: mx.array) -> mx.array:
        return logits + self.markov_w2(self.markov_w1(previous)).astype(logits.dtype)


class DSparkStage(Block):
    def __init__(self, args: ModelArgs, stage: int):
        super().__init__(_stage_args(args), 0)
        D, hc = args.hidden_size, args.hc_mult
        if stage == 0:
            self.main_proj = nn.Linear(D * len(args.dspark_target_layer_ids), D, bias=False)
            self.main_norm = RMSNorm(D, eps=args.rms_norm_eps)
        if stage == args.num_nextn_predict_layers - 1:
            self.norm = RMSNorm(D, eps=args.rms_norm_eps)
            self.hc_head_fn = mx.zeros((hc, hc * D))
            self.hc_head_base = mx.zeros((hc,))
            self.hc_head_scale = mx.ones((1,))
            self.markov_head = MarkovHead(args.vocab_size, args.dspark_markov_rank)

    def read_context(self, context: mx.array, cache: LayerCache) -> None:
        """Append the projected context of the next positions, context [B, S, D], to ``cache``."""
        attn = self.attn
        rows = attn.rope(attn.kv_norm(attn.wkv(context)), offset=cache.offset)
        cache.window_keys(rows)
        cache.offset += rows.shape[1]

    def __call__(self, h: mx.array, cache: LayerCache) -> mx.array:
        """The block's hc streams h [B, L, hc, D] through the stage, its queries at the positions
        that follow the context in ``cache`` (which is left as it is)."""
        a = self.args
        opts = split_options(a)
        x, post, comb = self._attn_input(h, opts)
        out = self._attend(x, cache)
        return self._ffn(out, h, post, comb, None, opts)

    def _attend(self, x: mx.array, cache: LayerCache) -> mx.array:
        attn, start = self.attn, cache.offset
        _, q, block_rows = attn._project(x, start)
        keys = block_rows
        if start:
            W = cache.sliding_window
            slots = mx.arange(max(0, start - W), start) % W
            context = cache.window_rows(slots)
            keys = mx.concatenate([context.astype(block_rows.dtype), block_rows], axis=1)
        q = q.transpose(0, 2, 1, 3)  # [B, H, L, hd]
        mask = mx.ones((q.shape[2], keys.shape[1]), dtype=mx.bool_)
        out = attn._sdpa(q, keys, mask, attn.attn_sink.astype(mx.float32))
        return attn._output(out.transpose(0, 2, 1, 3), start)


class DSpark(nn.Module):
    """The drafter: its stages sit at mtp.{s}.*, as in the checkpoint."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.mtp = [DSparkStage(args, s) for s in range(args.num_nextn_predict_layers)]

    @property
    def block_size(self) -> int:
        return self.args.dspark_block_size

    @property
    def tap_layers(self) -> Tuple[int, ...]:
        """The decoder layers whose outputs the drafter reads, in the order they are concatenated."""
        return tuple(sorted(self.args.dspark_target_layer_ids))

    def make_cache(self, kv_dtype: str = "fp8", index_dtype: str = "fp4", dtype=mx.float32) -> ModelCache:
        """One context window per stage; its offset is the number of positions read."""
        return layer_caches(_stage_args(self.args), [0] * len(self.mtp), kv_dtype, index_dtype, dtype)

    def read(self, taps: mx.array, cache: ModelCache) -> None:
        """Append the next positions' tapped decoder outputs, taps [B, S, D * n], to the context."""
        if not taps.shape[1]:
            return
        first = self.mtp[0]
        context = first.main_norm(first.main_proj(taps))
        for stage, layer_cache in zip(self.mtp, cache.layers):
            stage.read_context(context, layer_cache)

    def block_logits(self, tokens: mx.array, embed, head, cache: ModelCache) -> mx.array:
        """Logits [B, L, vocab] of the drafter's pass over the block ``tokens`` [B, L] (the anchor,
        then mask tokens), before the Markov head."""
        a = self.args
        x = embed(tokens)
        h = expand(x, a.hc_mult)
        for stage, layer_cache in zip(self.mtp, cache.layers):
            h = stage(h, layer_cache)
        last = self.mtp[-1]
        x = collapse(h, last, a)
        return split_outputs(head, last.norm(x))

    def propose(self, anchor: int, k: int, embed, head, cache: ModelCache,
                distribution=None) -> Tuple[List[int], Optional[mx.array]]:
        """k drafts after ``anchor`` from one drafter pass: greedy, the argmax chain through the
        Markov head; with ``distribution`` (see ``speculative.sampling_distribution``), each draft
        drawn from it, with the rows it was drawn from [k, vocab]."""
        if not 1 <= k <= self.block_size:
            raise ValueError(f"the DSpark drafter proposes 1..{self.block_size} tokens per pass "
                             f"(dspark_block_size), asked for {k}")
        block = [anchor] + [self.args.dspark_noise_token_id] * (k - 1)
        base = self.block_logits(mx.array([block], dtype=mx.int32), embed, head, cache)[0]
        markov = self.mtp[-1].markov_head
        drafts, rows, previous = [], [], anchor
        for i in range(k):
            logits = markov(base[i], mx.array(previous, dtype=mx.int32))
            if distribution is None:
                previous = int(mx.argmax(logits).item())
            else:
                row = distribution(logits)
                previous = int(mx.random.categorical(mx.log(row)).item())
                rows.append(row)
            drafts.append(previous)
        return drafts, (mx.stack(rows) if rows else None)


def check_dspark_shapes(args: ModelArgs, weights: dict, where: str) -> None:
    """Raise ValueError naming a DSpark tensor whose shape does not fit the target model."""
    name = "mtp.0.main_proj.weight"
    w = weights.get(name)
    if w is None:
        return
    D, n = args.hidden_size, len(args.dspark_target_layer_ids)
    # quantised weights pack their input dimension; the output dimension and, unquantised, both count
    packed = "mtp.0.main_proj.scales" in weights
    if w.shape[0] != D or (not packed and w.shape[1] != D * n):
        raise ValueError(
            f"{where}: tensor {name} has shape {tuple(w.shape)}, but the target model's "
            f"dspark_target_layer_ids {list(args.dspark_target_layer_ids)} tap {n} decoder layer(s) of "
            f"hidden_size {D}: expected ({D}, {D * n})")
