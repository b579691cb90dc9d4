"""DeepSeek-V4 in mlx-lm's model protocol.

A checkpoint directory carries ``mlx_dsv4_model.py`` (see ``mlx_lm_files``), which
re-exports ``Model`` and ``ModelArgs`` from here. mlx-lm then:

- builds ``Model(ModelArgs.from_dict(config))`` and passes every ``model*.safetensors``
  tensor through ``Model.sanitize`` (official layout -> MLX layout; MTP tensors dropped);
- asks ``Model.make_cache()`` for one cache object per layer and calls
  ``model(tokens, cache=caches)`` for logits ``[B, L, vocab]``.

The per-layer objects (``DeepseekV4LayerCache``) wrap this package's ``LayerCache``.
They cannot be trimmed (compressed entries fold several tokens, so dropping the last
tokens is not exact) and have no ``merge``, so mlx-lm's server serves requests one at a
time instead of batching them. mlx-lm's prompt-cache files rebuild classes found in
``mlx_lm.models.cache``; this module adds ``DeepseekV4LayerCache`` there when it is
imported, so a file loads once the model has been loaded in the same process.
"""

import sys
from typing import List, Optional

import mlx.core as mx

from .cache import LayerCache, ModelCache
from .config import ModelArgs as _DSV4Args
from .kvcodec import IndexCodec, KVCodec
from .loader import to_mlx_layout
from .model import Model as _DSV4Model
from .spec import has_indexer, is_mtp


class ModelArgs(_DSV4Args):
    """The package's ModelArgs; ``from_dict`` ignores mlx-lm's extra keys (model_file, ...)."""


class DeepseekV4LayerCache:
    """One layer's decoding state, in the shape of mlx-lm's cache objects."""

    def __init__(self, layer: LayerCache, kv_dtype: str, index_dtype: str, query_block: Optional[int]):
        self.layer = layer
        self.kv_dtype = kv_dtype
        self.index_dtype = index_dtype
        self.query_block = query_block

    @property
    def offset(self) -> int:
        return self.layer.offset

    def size(self) -> int:
        return self.layer.offset

    def empty(self) -> bool:
        return self.layer.offset == 0

    @property
    def nbytes(self) -> int:
        return self.layer.nbytes

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        return 0

    @property
    def state(self) -> dict:
        """Arrays and the numbers needed to rebuild the layer: what mlx-lm saves and evaluates."""
        layer, kv = self.layer, self.layer.kv_codec
        index = self.layer.indexer.codec if self.layer.indexer is not None else None
        arrays = {}
        layer.to_state("layer", arrays)
        meta = {
            "offset": layer.offset, "ratio": layer.ratio, "sliding_window": layer.sliding_window,
            "kv_dtype": self.kv_dtype, "index_dtype": self.index_dtype,
            "query_block": self.query_block if self.query_block is not None else -1,
            "head_dim": kv.head_dim, "rope_dim": kv.rope_dim, "dtype": str(kv.dtype).rsplit(".", 1)[-1],
            "index_head_dim": index.head_dim if index is not None else 0,
        }
        return {"meta": meta, "arrays": {k.replace(".", "/"): v for k, v in arrays.items()}}

    @state.setter
    def state(self, value: dict) -> None:
        meta, arrays = value["meta"], value["arrays"]
        dtype = getattr(mx, meta["dtype"])
        kv = KVCodec(meta["kv_dtype"], int(meta["head_dim"]), int(meta["rope_dim"]), dtype)
        ratio = int(meta["ratio"])
        index = IndexCodec(meta["index_dtype"], int(meta["index_head_dim"]), dtype) if has_indexer(ratio) else None
        layer = LayerCache(int(meta["sliding_window"]), ratio, kv, index)
        layer.load_state("layer", {k.replace("/", "."): v for k, v in arrays.items()}, int(meta["offset"]))
        query_block = int(meta["query_block"])
        self.__init__(layer, meta["kv_dtype"], meta["index_dtype"], None if query_block < 0 else query_block)

    @property
    def meta_state(self) -> str:
        return ""

    def __deepcopy__(self, memo):
        # mlx-lm's server copies cached prompts; the codecs hold MLX dtypes, which do not copy
        return type(self).from_state(self.state)

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls.__new__(cls)
        obj.state = state
        return obj


def _register_with_mlx_lm_caches() -> None:
    module = sys.modules.get("mlx_lm.models.cache")
    if module is not None and getattr(module, DeepseekV4LayerCache.__name__, None) is None:
        setattr(module, DeepseekV4LayerCache.__name__, DeepseekV4LayerCache)


_register_with_mlx_lm_caches()


class Model(_DSV4Model):
    """The package's Model with mlx-lm's hooks; parameters keep their names."""

    def __init__(self, args: _DSV4Args):
        super().__init__(args)
        self.model_type = "deepseek_v4"
        _register_with_mlx_lm_caches()

    def sanitize(self, weights: dict) -> dict:
        return to_mlx_layout({k: v for k, v in weights.items() if not is_mtp(k)}, self.args)

    def make_cache(self) -> List[DeepseekV4LayerCache]:
        cache = super().make_cache()
        return [DeepseekV4LayerCache(layer, cache.kv_dtype, cache.index_dtype, cache.query_block)
                for layer in cache.layers]

    def _model_cache(self, caches) -> ModelCache:
        if len(caches) != len(self.layers) or not all(isinstance(c, DeepseekV4LayerCache) for c in caches):
            kinds = sorted({type(c).__name__ for c in caches})
            raise ValueError(f"expected {len(self.layers)} DeepseekV4LayerCache objects (from model.make_cache()), "
                             f"got {len(caches)} of {', '.join(kinds) or 'nothing'}")
        ratios = [c.layer.ratio for c in caches]
        if ratios != list(self.args.compress_ratios):
            raise ValueError(f"this cache was made for layer schedule {ratios}, "
                             f"this model has {list(self.args.compress_ratios)}")
        first = caches[0]
        return ModelCache([c.layer for c in caches], first.kv_dtype, first.index_dtype, first.query_block)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, **kwargs) -> mx.array:
        if input_embeddings is not None:
            raise ValueError("DeepSeek-V4 takes token ids only, not input_embeddings")
        model_cache = None if cache is None else self._model_cache(cache)
        return super().__call__(inputs, cache=model_cache)
