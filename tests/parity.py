"""The executable reference: transformers' DeepseekV4ForCausalLM in float32 on CPU."""

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


def reference_logits(checkpoint_dir, tokens: np.ndarray, chunks=None) -> np.ndarray:
    """Logits [B, L, V] for tokens [B, L]; `chunks` feeds the sequence in pieces through the cache."""
    import torch
    from transformers import DynamicCache

    model = reference_model(str(checkpoint_dir))
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    with torch.no_grad():
        if not chunks:
            return model(ids, use_cache=False).logits.float().numpy()
        cache = DynamicCache(config=model.config)
        out, start = [], 0
        for size in chunks:
            piece = ids[:, start : start + size]
            out.append(model(piece, cache=cache, use_cache=True).logits.float().numpy())
            start += size
        return np.concatenate(out, axis=1)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
