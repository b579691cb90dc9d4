"""A decode step with the sliding window's rows decoded once, when written (the cache's decoded
copy), against decoding the whole stored window at every step (as before that copy existed).

Both run on the same checkpoint (same flags as `mlx-dsv4 bench`), from the same cache state
after a prefill of the context, taking turns step by step; each step restores the state first, so
both time the same step. Prints the median step of each and their ratio.

    python benchmarks/window_decode.py --hidden-size 256 --num-attention-heads 4 --q-lora-rank 64 \\
        --o-groups 2 --o-lora-rank 64 --index-n-heads 4 --moe-intermediate-size 128 --vocab-size 8192 \\
        --layers 4,128 --contexts 8192
"""

import argparse
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_dsv4 import bench
from mlx_dsv4.cache import LayerCache
from mlx_dsv4.cli.bench import add_arguments
from mlx_dsv4.loader import load_model


def decode_every_step(layer, slots):
    return layer.kv_codec.decode(tuple(p[:, slots] for p in layer._ring))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant (default 60)")
    args = p.parse_args(argv)
    path = bench.ensure_checkpoint(args, print)
    model = load_model(path)
    context = bench.parse_contexts(args.contexts)[0] if args.contexts else 8192
    prompt = np.random.default_rng(args.seed).integers(0, model.args.vocab_size, context).tolist()
    cache = model.make_cache()
    for i in range(0, context, args.chunk):
        mx.eval(model(mx.array([prompt[i : i + args.chunk]]), cache, last_only=True), cache.state())
    state = cache.to_state()
    variants = {"decoded copy": LayerCache.window_rows, "decode every step": decode_every_step}
    times = {name: [] for name in variants}
    try:
        for step in range(args.steps + 5):
            order = list(variants) if step % 2 else list(reversed(variants))
            for name in order:
                LayerCache.window_rows = variants[name]
                cache.load_state(*state)
                mx.eval(cache.state())
                start = time.perf_counter()
                mx.eval(model(mx.array([[5]]), cache))
                if step >= 5:  # the first steps compile and warm up
                    times[name].append(time.perf_counter() - start)
    finally:
        LayerCache.window_rows = variants["decoded copy"]
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, ms in median.items():
        print(f"{name:18s} {ms:7.3f} ms per step (median of {len(times[name])})")
    print(f"decode every step / decoded copy: {median['decode every step'] / median['decoded copy']:.3f}x "
          f"at {context} tokens of context")
    return 0


if __name__ == "__main__":
    sys.exit(main())
