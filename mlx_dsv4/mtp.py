"""The next-token-prediction (MTP) layers of the release, used as a speculative drafter.

MTP layer j reads, at position i, the main model's last hc streams h_i and the embedding of
token i + 1: e_proj(enorm(embed)) is added to h_proj(hnorm(h_i)) on every stream, one V4 block
(learned routing, its own cache) runs, then its own hc head and norm and the main model's
shared output head give logits for token i + 2.
"""

import copy
import mlx.core as mx
import mlx.nn as nn

from .cache import ModelCache
from .config import ModelArgs
from .hc import collapse
from .layers import RMSNorm
from .model import Block, layer_caches
from .streams import split_outputs


def _mtp_block_args(args: ModelArgs) -> ModelArgs:
    """The args a Block of MTP layer j reads as layer num_hidden_layers + j (never hash-routed)."""
    extended = copy.copy(args)
    extended.compress_ratios = list(args.compress_ratios) + list(args.mtp_compress_ratios)
    return extended


class MTP(Block):
    """MTP layer j: its block's tensors sit at mtp.{j}.* beside the input projections and head."""

    def __init__(self, args: ModelArgs, j: int):
        super().__init__(_mtp_block_args(args), args.num_hidden_layers + j)
        self.ratio = args.mtp_compress_ratios[j]
        D, hc = args.hidden_size, args.hc_mult
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, eps=args.rms_norm_eps)
        self.hnorm = RMSNorm(D, eps=args.rms_norm_eps)
        self.norm = RMSNorm(D, eps=args.rms_norm_eps)
        self.hc_head_fn = mx.zeros((hc, hc * D))
        self.hc_head_base = mx.zeros((hc,))
        self.hc_head_scale = mx.ones((1,))

    def make_cache(self, kv_dtype: str = "fp8", index_dtype: str = "fp4", dtype=mx.float32,
                   naive: bool = False) -> ModelCache:
        return layer_caches(self.args, [self.ratio], kv_dtype, index_dtype, dtype, naive)

    def __call__(self, hidden: mx.array, next_tokens: mx.array, embed, head, cache: ModelCache):
        """(logits [B, L, vocab], own hc streams [B, L, hc, D]) for main streams hidden [B, L, hc, D]
        and the tokens that follow each position, next_tokens [B, L]."""
        a = self.args
        e = self.e_proj(self.enorm(embed(next_tokens)))
        h = self.h_proj(self.hnorm(hidden.astype(e.dtype)))
        h = e[:, :, None, :] + h
        h = super().__call__(h, next_tokens, cache.layers[0], cache.query_block)
        x = collapse(h, self, a)
        return split_outputs(head, self.norm(x)), h
