"""How close to the decode roofline MLX's own kernels can get on this machine.

The roofline `mlx-dsv4 bench` reports is the bytes of weights one decode token reads over
the measured read bandwidth. This measures two floors on the same checkpoint (same flags
as the bench), each evaluated as one graph, best of several runs:

- weights: one matrix-vector product per weight matrix a decode token reads (active
  experts only, embedding excluded), nothing else;
- weights + attention: plus the two products exact attention cannot avoid at the given
  context: scores and values over window + top-k keys (ratio 4) or window + all
  compressed entries (ratio 128), every head, in the model's dtype.

Each floor is the faster of two schedules: every product on one stream, and the products
dealt round-robin over one CPU stream per core (as the bandwidth probe's split reduction is). No implementation of the model can beat
them with the same kernels, so roofline / floor is the most of the roofline any MLX
implementation reaches here.

    python benchmarks/decode_floor.py --hidden-size 256 ... --contexts 8192
"""

import argparse
import sys

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_dsv4 import bench
from mlx_dsv4.bench import best_seconds
from mlx_dsv4.cli.bench import add_arguments
from mlx_dsv4.loader import load_model
from mlx_dsv4.streams import on, parallel_streams


def weight_products(model):
    """(vector, matrix) pairs: one product per weight matrix a decode token reads."""
    a = model.args
    pairs = []
    for name, w in tree_flatten(model.parameters()):
        if w.ndim < 2 or name.startswith("embed.") or name.endswith("tid2eid"):
            continue
        mats = w.reshape(-1, *w.shape[-2:])
        if ".ffn.experts." in name:
            mats = mats[: a.num_experts_per_tok]
        for m in mats:
            pairs.append((mx.random.normal((1, m.shape[-1])).astype(w.dtype), m))
    return pairs


def attention_products(model, context: int):
    """(queries, keys) per attention layer: the keys one decode query attends to at `context`."""
    a, dtype = model.args, model.dtype
    out = []
    for ratio in a.compress_ratios:
        n_keys = min(context, a.sliding_window)
        if ratio == 4:
            n_keys += min(a.index_topk, context // 4)
        elif ratio:
            n_keys += context // ratio
        q = mx.random.normal((a.num_attention_heads, a.head_dim)).astype(dtype)
        out.append((q, mx.random.normal((n_keys, a.head_dim)).astype(dtype)))
    return out


def spread(products, streams) -> list:
    """Outputs of zero-argument product functions, dealt over `streams`."""
    outs = []
    for i, product in enumerate(products):
        with on(streams[i % len(streams)]):
            outs.append(product())
    return outs


def fastest(products) -> float:
    """Seconds for all products: the better of one stream and of every core's stream."""
    return min(best_seconds(lambda: mx.eval(spread(products, streams)))
               for streams in ((None,), parallel_streams()))


def attend(q, k):
    s = mx.softmax((q @ k.T).astype(mx.float32), axis=-1).astype(k.dtype)
    return s @ k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    path = bench.ensure_checkpoint(args, print)
    model = load_model(path)
    bw = bench.measure_bandwidth(args.bandwidth_mb, model.dtype)["bytes_per_s"]
    weight_bytes = bench.decode_weight_bytes(model)["decode_weight_bytes"]
    roofline_s = weight_bytes / bw
    pairs = weight_products(model)
    mx.eval(pairs)
    weight_fns = [lambda x=x, w=w: x @ w.T for x, w in pairs]
    weights_s = fastest(weight_fns)
    print(f"bandwidth {bw / 1e9:.2f} GB/s; weights per decode token {weight_bytes / 1e6:.2f} MB "
          f"in {len(pairs)} matrices; roofline {1e3 * roofline_s:.3f} ms/token ({1 / roofline_s:.1f} tok/s)")
    print(f"floor, weight products only: {1e3 * weights_s:.3f} ms = {100 * roofline_s / weights_s:.1f}% of the roofline")
    for context in bench.parse_contexts(args.contexts):
        attn = attention_products(model, context)
        mx.eval(attn)

        attn_fns = [lambda q=q, k=k: attend(q, k) for q, k in attn]
        total_s = fastest(weight_fns + attn_fns)
        print(f"floor at {context:>6}, weights + attention products: {1e3 * total_s:.3f} ms "
              f"= {100 * roofline_s / total_s:.1f}% of the roofline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
