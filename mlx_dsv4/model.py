"""The DeepSeek-V4 decoder: embedding, mHC blocks of attention + MoE, hc head."""

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .attention import QUERY_BLOCK, Attention
from .cache import LayerCache, ModelCache
from .config import ModelArgs
from .hc import collapse, expand, hc_merge, hc_split, split_options
from .kvcodec import IndexCodec, KVCodec
from .layers import RMSNorm
from .moe import MoE
from .spec import has_indexer, mix_width
from .streams import split_outputs, split_tokens


def layer_caches(args: ModelArgs, ratios, kv_dtype: str, index_dtype: str, dtype, naive: bool = False) -> ModelCache:
    """A fresh cache for layers of the given compress ratios (the decoder's, or an MTP layer's)."""
    kv = KVCodec(kv_dtype, args.head_dim, args.qk_rope_head_dim, dtype)
    index = IndexCodec(index_dtype, args.index_head_dim, dtype) if any(map(has_indexer, ratios)) else None
    layers = [LayerCache(args.sliding_window, r, kv, index if has_indexer(r) else None, keep_all_rows=naive)
              for r in ratios]
    return ModelCache(layers, kv_dtype, index_dtype, query_block=None if naive else QUERY_BLOCK)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.args = args
        D, hc = args.hidden_size, args.hc_mult
        mix = mix_width(args)
        self.attn_norm = RMSNorm(D, eps=args.rms_norm_eps)
        self.ffn_norm = RMSNorm(D, eps=args.rms_norm_eps)
        self.attn = Attention(args, layer_id)
        self.ffn = MoE(args, layer_id)
        self.hc_attn_fn = mx.zeros((mix, hc * D))
        self.hc_attn_base = mx.zeros((mix,))
        self.hc_attn_scale = mx.ones((3,))
        self.hc_ffn_fn = mx.zeros((mix, hc * D))
        self.hc_ffn_base = mx.zeros((mix,))
        self.hc_ffn_scale = mx.ones((3,))

    def __call__(self, h: mx.array, tokens: mx.array, cache: LayerCache, query_block) -> mx.array:
        a = self.args
        opts = split_options(a)
        x, post, comb = split_tokens(lambda h: self._attn_input(h, opts), h)
        out = self.attn(x, cache, query_block)
        return split_tokens(lambda *a: self._ffn(*a, opts), out, h, post, comb, tokens)

    def _attn_input(self, h, opts):
        x, post, comb = hc_split(h, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, **opts)
        return self.attn_norm(x), post, comb

    def _ffn(self, attn_out, h, post, comb, tokens, opts):
        h = hc_merge(attn_out, h, post, comb)
        x, post, comb = hc_split(h, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, **opts)
        return hc_merge(self.ffn(self.ffn_norm(x), tokens), h, post, comb)


class TiedHead:
    """The vocabulary head of a tie_word_embeddings checkpoint: the model's embedding (float or
    quantised) read as a linear layer. It holds no tensor, so the checkpoint has no head.weight."""

    def __init__(self, model: "Model"):
        self._model = model  # not the embedding itself: quantisation replaces that module

    def __call__(self, x: mx.array) -> mx.array:
        return self._model.embed.as_linear(x)

    def __getitem__(self, key):
        return self._model.embed[key]

    def __contains__(self, key) -> bool:
        return key in self._model.embed

    def get(self, key, default=None):
        return self._model.embed.get(key, default)

    def __getattr__(self, name):  # group_size, bits, mode of a quantised embedding
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._model.embed, name)


class Model(nn.Module):
    # The checkpoint's MTP layers (mlx_dsv4.mtp.MTP), set by the loader outside the parameter
    # tree: they share `embed` and `head` and do not change what the main model is.
    mtp_layers: tuple = ()
    # The checkpoint's DSpark drafter (mlx_dsv4.dspark.DSpark) when its mtp.* stages are one, set
    # the same way.
    dspark = None
    # What make_cache() stores by default: V4's as-trained FP8 kv rows and FP4 indexer keys.
    cache_dtypes: tuple = ("fp8", "fp4")

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        D, hc = args.hidden_size, args.hc_mult
        self.embed = nn.Embedding(args.vocab_size, D)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(D, eps=args.rms_norm_eps)
        if args.tie_word_embeddings:
            object.__setattr__(self, "head", TiedHead(self))  # outside the parameter tree
        else:
            self.head = nn.Linear(D, args.vocab_size, bias=False)
        self.hc_head_fn = mx.zeros((hc, hc * D))
        self.hc_head_base = mx.zeros((hc,))
        self.hc_head_scale = mx.ones((1,))

    @property
    def dtype(self):
        """The activation dtype: that of the embedding, or bfloat16 when it is quantised."""
        w = self.embed.weight
        return w.dtype if mx.issubdtype(w.dtype, mx.floating) else mx.bfloat16

    def set_cache_dtypes(self, kv_dtype: str, index_dtype: str) -> None:
        """The storage make_cache() uses when not told otherwise (generation, prompt caches)."""
        from .memory import INDEX_DTYPES, KV_DTYPES

        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype {kv_dtype!r}: expected one of {KV_DTYPES}")
        if index_dtype not in INDEX_DTYPES:
            raise ValueError(f"index_dtype {index_dtype!r}: expected one of {INDEX_DTYPES}")
        object.__setattr__(self, "cache_dtypes", (kv_dtype, index_dtype))  # not a module or parameter

    def make_cache(self, kv_dtype: Optional[str] = None, index_dtype: Optional[str] = None,
                   naive: bool = False) -> ModelCache:
        """A fresh cache. kv_dtype: "fp8" (as trained), "bf16" or "float" (the activation dtype, exact);
        index_dtype for the indexer: "fp4" (as trained: keys and queries Hadamard-rotated, then FP4),
        "fp8", "bf16" or "float" (unrotated keys, queries as computed). Unset: ``cache_dtypes``.

        naive=True is the benchmark baseline: every raw kv row is kept and each step's
        queries are scored in one dense block.
        """
        kv_dtype = kv_dtype or self.cache_dtypes[0]
        index_dtype = index_dtype or self.cache_dtypes[1]
        return layer_caches(self.args, self.args.compress_ratios, kv_dtype, index_dtype, self.dtype, naive)

    def __call__(self, tokens: mx.array, cache: Optional[ModelCache] = None, last_only: bool = False,
                 return_hidden: bool = False, tap_layers: Optional[Sequence[int]] = None):
        """Logits [B, L, vocab] (or [B, 1, vocab] with last_only) for tokens [B, L], continuing `cache`;
        with return_hidden, (logits, last hc streams [B, L, hc, D]) as the MTP layers read them, or
        with ``tap_layers`` (decoder layer indices) the outputs of those layers averaged over their
        hc streams and concatenated in layer order [B, L, D * n], as the DSpark drafter reads them."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, length], got {tokens.shape}")
        if cache is None:
            cache = self.make_cache()
        a = self.args
        x = self.embed(tokens)
        h = expand(x, a.hc_mult)
        taps = []
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            h = layer(h, tokens, layer_cache, cache.query_block)
            if tap_layers is not None and i in tap_layers:
                taps.append(h.mean(axis=2))
        hidden = h if tap_layers is None else mx.concatenate(taps, axis=-1)
        if last_only:
            h = h[:, -1:]
        x = collapse(h, self, a)
        logits = split_outputs(self.head, self.norm(x))
        return (logits, hidden) if return_hidden else logits
