"""`mlx-dsv4 demo`: the walk-through of mlx_dsv4.demo on the tiny trained checkpoint (or a random one)."""

from pathlib import Path


def add_arguments(p):
    p.add_argument("--random", action="store_true", help="run on a tiny random checkpoint instead of the trained one")
    p.add_argument("--dir", type=Path, default=None,
                   help="where to write the tiny random checkpoint (implies --random; default: a temp dir)")
    p.add_argument("--tokens", type=int, default=64, help="tokens to decode greedily")
    p.add_argument("--seed", type=int, default=0, help="seed of the random checkpoint")


def run(args):
    from ..demo import run_demo

    return run_demo(args.dir, n_tokens=args.tokens, seed=args.seed, random=args.random)
