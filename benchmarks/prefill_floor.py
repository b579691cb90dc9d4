"""The floor of prefill time per token at long context on this machine: the indexer's score products.

Every query of a CSA layer scores every entry it sees: index_n_heads x index_head_dim x (position / 4)
multiply-adds per token, in float32 against the decoded keys, however the rest of the layer is done.
This times exactly those products, at the shapes the attention runs them (a 128-query block against
blocks of 2048 decoded keys laid out [d, entries]), best of several runs, and the model's whole
prefill time per token at a short context (one chunk after as many tokens, as the bench's "last
chunk" figure). With --cpu-streams N, query blocks run N at a time, each product on its own core,
so the score floor is divided by N. The growth no implementation using these kernels can go below is then

    (time per token at the short context + score floor at C - score floor at the short context)
    / time per token at the short context

    python benchmarks/prefill_floor.py --contexts 32768,262144 [mlx-dsv4 bench model flags]
"""

import argparse
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_dsv4 import bench
from mlx_dsv4.bench import best_seconds
from mlx_dsv4.cli.bench import add_arguments
from mlx_dsv4.loader import load_model
from mlx_dsv4.memory import INDEX_ENTRY_BLOCK, QUERY_BLOCK
from mlx_dsv4.streams import cpu_stream_limit, parallel_streams


def score_block_seconds(n_heads: int, head_dim: int) -> float:
    """Seconds of one 128-query block's float32 score product over INDEX_ENTRY_BLOCK decoded keys."""
    q = mx.random.normal((1, n_heads, QUERY_BLOCK, head_dim))
    keys = mx.contiguous(mx.random.normal((1, INDEX_ENTRY_BLOCK, head_dim)).swapaxes(-1, -2))[:, None]
    mx.eval(q, keys)
    return best_seconds(lambda: mx.eval(q @ keys), runs=5)


def score_floor_per_token(args, block_s: float, context: int, chunk: int, streams: int = 1) -> float:
    """Seconds per token of the score products alone, for a chunk ending at `context` tokens, with
    query blocks on `streams` cores at once."""
    entries = (context - chunk / 2) / 4  # the chunk's queries see, on average, its middle position's entries
    csa_layers = sum(1 for r in args.compress_ratios if r == 4)
    return csa_layers * block_s * (entries / INDEX_ENTRY_BLOCK) / QUERY_BLOCK / streams


def short_context_seconds_per_token(model, context: int, chunk: int) -> float:
    """The model's prefill seconds per token of one `chunk`-token chunk after `context - chunk` tokens."""
    tokens = mx.array(np.random.default_rng(0).integers(2, model.args.vocab_size, (1, context)))
    best = float("inf")
    for _ in range(2):
        cache = model.make_cache()
        for s in range(0, context - chunk, chunk):
            mx.eval(model(tokens[:, s : s + chunk], cache, last_only=True), cache.state())
        start = time.perf_counter()
        mx.eval(model(tokens[:, context - chunk :], cache, last_only=True), cache.state())
        best = min(best, (time.perf_counter() - start) / chunk)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--short-context", type=int, default=1024, help="the reference context (default 1024)")
    p.add_argument("--short-chunk", type=int, default=1024,
                   help="its timed chunk (default 1024: the whole short prompt in one chunk, as the bench times it)")
    args = p.parse_args(argv)
    with cpu_stream_limit(args.cpu_streams):
        return measure(args)


def measure(args) -> int:
    contexts = bench.parse_contexts(args.contexts)
    path = bench.ensure_checkpoint(args, lambda m: print(m, file=sys.stderr))
    model = load_model(path, check_memory=False)
    a = model.args
    block_s = score_block_seconds(a.index_n_heads, a.index_head_dim)
    flops = 2 * a.index_n_heads * QUERY_BLOCK * INDEX_ENTRY_BLOCK * a.index_head_dim
    print(f"score block: {a.index_n_heads} heads x {QUERY_BLOCK} queries x {a.index_head_dim} "
          f"x {INDEX_ENTRY_BLOCK} keys, float32: {block_s * 1e3:.1f} ms ({flops / block_s / 1e9:.2f} GFLOP/s)", flush=True)
    streams = len(parallel_streams())
    short = short_context_seconds_per_token(model, args.short_context, args.short_chunk)
    short_floor = score_floor_per_token(a, block_s, args.short_context, args.short_chunk, streams)
    print(f"prefill per token at {args.short_context} ({streams} CPU stream(s)): {short * 1e3:.2f} ms "
          f"(of which score products {short_floor * 1e3:.2f} ms)", flush=True)
    for context in contexts:
        floor = score_floor_per_token(a, block_s, context, args.chunk, streams)
        growth = (short + floor - short_floor) / short
        print(f"context {context}: score products {floor * 1e3:.2f} ms per token; prefill per token "
              f"at least {growth:.2f}x that at {args.short_context}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
