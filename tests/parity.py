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


# The precision DeepSeek-V4 was trained with, as DeepSeek's inference code simulates it
# (docs/precision.md): written here in torch from those facts, apart from the MLX cache.
FP8_GROUP, FP8_MAX = 64, 448.0
FP4_GROUP, FP4_MAX = 32, 6.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _power_of_two_at_least(v):
    """2^ceil(log2(v)) for positive float32 v, exactly (frexp: v = m * 2^e with m in [0.5, 1))."""
    import torch

    m, e = torch.frexp(v)
    return torch.ldexp(torch.ones_like(v), torch.where(m == 0.5, e - 1, e))


def _groups(t, size):
    """float32 [..., n] -> [..., ceil(n / size), size], the last group padded with zeros."""
    import torch

    n = t.shape[-1]
    padded = torch.nn.functional.pad(t.float(), (0, -n % size))
    return padded.unflatten(-1, (-1, size))


def fp8_simulated(t):
    """E4M3 with a power-of-two scale per 64 values (amax floored at 1e-4), read back as float32."""
    import torch

    g = _groups(t, FP8_GROUP)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    scale = _power_of_two_at_least(amax * torch.tensor(1 / FP8_MAX, dtype=torch.float32))
    q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return q.flatten(-2)[..., : t.shape[-1]].to(t.dtype)


def e2m1_nearest_even(a):
    """|values| <= 6 rounded to the nearest E2M1 magnitude; a tie goes to the even code."""
    import torch

    grid = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    below = (torch.searchsorted(grid, a.contiguous(), right=True) - 1).clamp(0, len(grid) - 1)
    above = (below + 1).clamp(max=len(grid) - 1)
    lo, hi = grid[below], grid[above]
    up = (a - lo > hi - a) | ((a - lo == hi - a) & (below % 2 == 1))
    return torch.where(up, hi, lo)


def fp4_simulated(t):
    """E2M1 with a power-of-two scale per 32 values (amax floored at 6 * 2^-126), read back as float32."""
    import torch

    g = _groups(t, FP4_GROUP)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126)
    scale = _power_of_two_at_least(amax * torch.tensor(1 / FP4_MAX, dtype=torch.float32))
    y = (g / scale).clamp(-FP4_MAX, FP4_MAX)
    return (torch.sign(y) * e2m1_nearest_even(y.abs()) * scale).flatten(-2).to(t.dtype)


@functools.lru_cache(maxsize=4)
def walsh_hadamard(n: int):
    """The orthonormal n x n Walsh-Hadamard matrix in Sylvester order (symmetric)."""
    import torch

    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise ValueError(f"Walsh-Hadamard size {n} is not a power of two")
    return h * n**-0.5


def indexer_simulated(t):
    """Indexer keys and queries as trained: Hadamard-rotated over the head dim, then FP4."""
    return fp4_simulated(t @ walsh_hadamard(t.shape[-1]).to(t.dtype))


def kv_row_simulated(t, rope_dim: int):
    """kv rows as trained: FP8 non-RoPE dims, BF16 RoPE dims."""
    import torch

    return torch.cat([fp8_simulated(t[..., :-rope_dim]), _rounded(t[..., -rope_dim:])], dim=-1)


@contextlib.contextmanager
def trained_precision(rope_dim: int):
    """Attention compressed entries as FP8 rows, indexer keys and queries rotated and in FP4, at
    the points DeepSeek's inference code rounds them: entries after norm and RoPE, queries after RoPE."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref

    cls, scorer = ref.DeepseekV4HCACache, ref.DeepseekV4IndexerScorer
    update_states, score = cls.update_compressor_states, scorer.forward

    def update_rounded(self, name, c):
        return update_states(self, name, indexer_simulated(c) if name == "indexer" else kv_row_simulated(c, rope_dim))

    cls.update_compressor_states = update_rounded
    scorer.forward = lambda self, q, keys, hidden: score(self, indexer_simulated(q), keys, hidden)
    try:
        yield
    finally:
        cls.update_compressor_states, scorer.forward = update_states, score


def _window_as_trained(cache, rope_dim: int):
    """Window kv rows stored as trained (FP8 non-RoPE dims, BF16 RoPE dims) as every layer's cache takes them."""
    update = cache.update
    cache.update = lambda k, v, *args, **kwargs: update(
        kv_row_simulated(k, rope_dim), kv_row_simulated(v, rope_dim), *args, **kwargs)
    return cache


STORAGES = ("float", "bf16", "as-trained")


def reference_logits(checkpoint_dir, tokens: np.ndarray, chunks=None, storage: str = "float") -> np.ndarray:
    """Logits [B, L, V] for tokens [B, L]; `chunks` feeds the sequence in pieces through the cache.

    storage="bf16" runs the cached path with every row the cache takes rounded to BF16: what
    `kv_dtype="bf16", index_dtype="bf16"` stores. storage="as-trained" stores rows in the
    precision V4 was trained with (`trained_precision`, `_window_as_trained`): what the default
    `make_cache()` stores. Rows of the current step are read back rounded too, and all other
    arithmetic stays float32.
    """
    import torch
    from transformers import DynamicCache

    model = reference_model(str(checkpoint_dir))
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r}: expected one of {STORAGES}")
    if storage != "float":
        chunks = chunks or [ids.shape[1]]
    rope_dim = model.config.qk_rope_head_dim
    with torch.no_grad():
        if not chunks:
            return model(ids, use_cache=False).logits.float().numpy()
        cache = DynamicCache(config=model.config)
        if storage == "bf16":
            _window_in_bfloat16(cache)
        elif storage == "as-trained":
            _window_as_trained(cache, rope_dim)
        rounding = {"bf16": entries_in_bfloat16, "as-trained": lambda: trained_precision(rope_dim)}
        out, start = [], 0
        with rounding.get(storage, contextlib.nullcontext)():
            for size in chunks:
                piece = ids[:, start : start + size]
                out.append(model(piece, cache=cache, use_cache=True).logits.float().numpy())
                start += size
        return np.concatenate(out, axis=1)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def reference_layer_streams(checkpoint_dir, tokens: np.ndarray, chunks, storage: str = "as-trained"):
    """The cached reference run of `reference_logits`, with every decoder layer's residual streams:
    (inputs, outputs, logits); inputs[i][c] / outputs[i][c] are layer i's streams [B, n, hc, D]
    for chunk c, logits [B, L, V]."""
    model = reference_model(str(checkpoint_dir))
    n_layers = len(model.model.layers)
    inputs, outputs = [[] for _ in range(n_layers)], [[] for _ in range(n_layers)]
    hooks = []
    for layer, ins, outs in zip(model.model.layers, inputs, outputs):
        hooks.append(layer.register_forward_pre_hook(lambda m, args, ins=ins: ins.append(args[0].numpy().copy())))
        hooks.append(layer.register_forward_hook(lambda m, args, out, outs=outs: outs.append(out.numpy().copy())))
    try:
        logits = reference_logits(checkpoint_dir, tokens, chunks=chunks, storage=storage)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, outputs, logits
