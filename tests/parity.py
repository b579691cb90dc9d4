"""The executable reference: transformers' DeepseekV4ForCausalLM in float32 on CPU."""

import contextlib
import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def reference_model(checkpoint_dir: str):
    import torch
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    model.eval()
    return model


def _rounded(t):
    import torch

    return t.to(torch.bfloat16).to(t.dtype)


@contextlib.contextmanager
def entries_in_bfloat16():
    """Compressed entries (attention's and indexer's) rounded to BF16 as the cache takes them, after RoPE."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref

    cls = ref.DeepseekV4HCACache  # the CSA cache inherits it
    update_states = cls.update_compressor_states
    cls.update_compressor_states = lambda self, name, c: update_states(self, name, _rounded(c))
    try:
        yield
    finally:
        cls.update_compressor_states = update_states


def _window_in_bfloat16(cache):
    """Window kv rows rounded to BF16 as every layer's cache takes them, after RoPE."""
    update = cache.update
    cache.update = lambda k, v, *args, **kwargs: update(_rounded(k), _rounded(v), *args, **kwargs)
    return cache


def reference_logits(checkpoint_dir, tokens: np.ndarray, chunks=None, storage: str = "float") -> np.ndarray:
    """Logits [B, L, V] for tokens [B, L]; `chunks` feeds the sequence in pieces through the cache.

    storage="bf16" runs the cached path with every row the cache takes rounded to BF16: what
    `kv_dtype="bf16", index_dtype="bf16"` stores. Rows of the current step are read back
    rounded too, and all arithmetic stays float32.
    """
    import torch
    from transformers import DynamicCache

    model = reference_model(str(checkpoint_dir))
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    if storage not in ("float", "bf16"):
        raise ValueError(f"storage {storage!r}")
    if storage == "bf16":
        chunks = chunks or [ids.shape[1]]
    with torch.no_grad():
        if not chunks:
            return model(ids, use_cache=False).logits.float().numpy()
        cache = DynamicCache(config=model.config)
        bf16 = storage == "bf16"
        if bf16:
            _window_in_bfloat16(cache)
        out, start = [], 0
        with entries_in_bfloat16() if bf16 else contextlib.nullcontext():
            for size in chunks:
                piece = ids[:, start : start + size]
                out.append(model(piece, cache=cache, use_cache=True).logits.float().numpy())
                start += size
        return np.concatenate(out, axis=1)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
