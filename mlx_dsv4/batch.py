"""One decoding step over several sequences, each with its own cache.

The model's batch rows share one cache offset, so sequences of different lengths cannot
share a ``ModelCache``. Here each sequence keeps its own. The embedding, the
hyper-connection mixes, the attention's projections (queries, kv rows, compressors,
indexer queries, output; RoPE at each row's own position), the MoE and the head run once
over the [B, 1] batch: their weights are read once per step, not once per sequence. The
rest of each layer's attention (window, compressor pooling, indexer selection, scores)
runs row by row against that row's own layer cache, exactly as a solo step would.
Nothing mixes rows: routing (score- or hash-based) is per token.
"""

from typing import List, Sequence

import mlx.core as mx

from .cache import ModelCache
from .hc import collapse, expand, split_options
from .streams import split_outputs


def decode_rows(model, tokens: Sequence[int], caches: List[ModelCache]) -> mx.array:
    """Logits [B, vocab] of ``tokens[i]`` appended to ``caches[i]`` (one token per sequence);
    each cache advances by one token."""
    if len(tokens) != len(caches) or not tokens:
        raise ValueError(f"decode_rows: {len(tokens)} tokens for {len(caches)} caches")
    a = model.args
    opts = split_options(a)
    ids = mx.array(list(tokens), dtype=mx.int32)[:, None]  # [B, 1]
    x = model.embed(ids)
    h = expand(x, a.hc_mult)
    for i, layer in enumerate(model.layers):
        attn_in, post, comb = layer._attn_input(h, opts)
        attn = layer.attn
        offsets = mx.array([cache.layers[i].offset for cache in caches])
        q_lora, q, kv = attn._project(attn_in, offsets)
        side = attn.side_projections(attn_in, q_lora, offsets, caches[0].layers[i].indexer.codec
                                     if attn.ratio == 4 else None)
        rows = [attn.attend(attn_in[r : r + 1], q_lora[r : r + 1], q[r : r + 1], kv[r : r + 1], cache.layers[i],
                            cache.query_block, _row(side, r))
                for r, cache in enumerate(caches)]
        out = attn._output(mx.concatenate(rows, axis=0), offsets)
        h = layer._ffn(out, h, post, comb, ids, opts)
    x = collapse(h, model, a)
    return split_outputs(model.head, model.norm(x))[:, -1, :]


def _row(arrays, r: int):
    """Row ``r`` of every array in a nest of dicts and tuples."""
    if isinstance(arrays, dict):
        return {k: _row(v, r) for k, v in arrays.items()}
    if isinstance(arrays, tuple):
        return tuple(_row(v, r) for v in arrays)
    return arrays[r : r + 1]


def _pick(run, logits: mx.array):
    """``run.pick(logits)``, drawing from the run's own PRNG key when it was given a seed, so a
    seeded generation samples what it would alone whatever else decodes beside it."""
    from .generate import _global_random_seed, _restore_global_random_seed

    if run.seed_key is None:
        return run.pick(logits)
    outside = _global_random_seed()
    mx.random.seed(run.seed_key)
    try:
        picked = run.pick(logits)
        run.seed_key = _global_random_seed()
    finally:
        _restore_global_random_seed(outside)
    return picked


class DecodeBatch:
    """Generations (``mlx_dsv4.generate.open_generation``, prefilled) decoding together: each
    ``step`` samples one token for every one of them."""

    def __init__(self, model):
        self.model = model
        self.runs = []  # in the order they joined
        self._next = {}  # id(run) -> the token its next forward pass feeds

    def __len__(self):
        return len(self.runs)

    def add(self, run) -> None:
        """Join a prefilled generation: its first step samples after its last prompt token."""
        self.runs.append(run)
        self._next[id(run)] = run.ids[-1]

    def remove(self, run, keep: bool = True) -> None:
        """Leave early (a cancelled request); with ``keep``, what its cache holds goes to its prompt cache."""
        self.runs.remove(run)
        del self._next[id(run)]
        if keep:
            run.keep_prefix()

    def step(self) -> list:
        """One token for every generation: [(run, GenerationStep)]; a step with a finish_reason
        is that generation's last, and it has left the batch."""
        runs = list(self.runs)
        tokens = [self._next[id(run)] for run in runs]
        for run in runs:
            run.consistent = False
        logits = decode_rows(self.model, tokens, [run.cache for run in runs])
        for run, token in zip(runs, tokens):
            run.fed.append(token)
            run.consistent = True
        picked = [_pick(run, logits[i : i + 1]) for i, run in enumerate(runs)]
        mx.eval([a for pair in picked for a in pair])
        out = []
        for run, (y, logprob) in zip(runs, picked):
            token, lp, reason, piece = run.take(y, logprob, run.max_tokens)
            if reason is None:
                self._next[id(run)] = token
                out.append((run, run.step(piece, token, lp)))
                run.pending = None
            else:
                self.runs.remove(run)
                del self._next[id(run)]
                out.append((run, run._finish(token, lp, piece, reason)))
        return out
