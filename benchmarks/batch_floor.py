"""The most batching can speed up decoding with MLX's own kernels on this machine.

A batched decode step reads every weight matrix once for all rows, so on hardware whose
matrix products cost about the same for a few rows as for one (bandwidth-bound, as on a
Mac's GPU) B streams decode up to B times faster than one. This measures what the
products cost here: for every weight matrix one decode token reads (the same set as
benchmarks/decode_floor.py, the active experts taken as shared by every row, the best
case), one product with 1 row and one with B rows, each evaluated as one graph, best of
several runs. B * t(1) / t(B) bounds the aggregate speedup of B streams over one: attention,
sampling and everything else only lower it.

    python benchmarks/batch_floor.py                      # reduced-width model, 1/4/8 rows
    python benchmarks/batch_floor.py --rows 1,2,4,8,16 --hidden-size 1024 ...
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_floor import weight_products  # noqa: E402

from mlx_dsv4 import bench  # noqa: E402
from mlx_dsv4.bench import best_seconds  # noqa: E402
from mlx_dsv4.cli.bench import add_arguments  # noqa: E402
from mlx_dsv4.loader import load_model  # noqa: E402


def products_seconds(pairs, rows: int) -> float:
    xs = [(mx.random.normal((rows, m.shape[-1])).astype(m.dtype), m) for _, m in pairs]
    mx.eval(xs)
    return best_seconds(lambda: mx.eval([x @ m.T for x, m in xs]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--rows", default="1,4,8", help="batch rows to time (default 1,4,8)")
    args = p.parse_args(argv)
    rows = sorted({int(r) for r in args.rows.split(",")} | {1})
    path = bench.ensure_checkpoint(args, print)
    model = load_model(path)
    pairs = weight_products(model)
    weight_bytes = sum(m.nbytes for _, m in pairs)
    print(f"{len(pairs)} weight matrices, {weight_bytes / 2**20:.1f} MiB read per decode step ({model.dtype})")
    one = products_seconds(pairs, 1)
    print("| rows | products (ms) | per row (ms) | most speedup of that many streams over one |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        t = one if r == 1 else products_seconds(pairs, r)
        print(f"| {r} | {1e3 * t:.2f} | {1e3 * t / r:.2f} | {r * one / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
