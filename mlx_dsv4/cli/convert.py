"""``mlx-dsv4 convert``: command-line front end of the converter."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..convert.errors import ConvertError
from ..convert.recipes import RECIPES, Recipe
from ..sizes import format_decimal_bytes


def _bits(v: str):
    if v in ("native", "none"):
        return None if v == "none" else v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bits (2-8), 'native' or 'none', got {v!r}") from None


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-path", help="Hub repo id (e.g. deepseek-ai/DeepSeek-V4-Flash) or local directory")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--mlx-path", "-o", help="output directory")
    p.add_argument("--recipe", choices=RECIPES, default="native",
                   help="native: keep the release bits (mxfp8/mxfp4); q8..q2: affine experts; none: float")
    p.add_argument("--group-size", type=int, default=64, help="affine group size (32, 64, 128)")
    p.add_argument("--dense-bits", type=_bits, default=8,
                   help="affine bits for attention and shared experts, or 'native' for mxfp8 (default 8)")
    p.add_argument("--embed-bits", type=_bits, default=8, help="bits for embedding and head, or 'none' (default 8)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="float dtype of unquantised tensors (default bfloat16; float32 for --recipe none)")
    p.add_argument("--no-mtp", action="store_true", help="drop the MTP (mtp.*) tensors")
    p.add_argument("--shard-size", type=_positive(float), default=5.0, help="max shard size in GB (default 5)")
    p.add_argument("--max-size", type=_positive(float), help="refuse when the output would exceed this many GB")
    p.add_argument("--context", type=_positive(int), default=32768, help="context length for the memory estimate")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--estimate-only", action="store_true", help="print size and memory estimates, write nothing")
    p.add_argument("--config", help="config.json to estimate from (with --estimate-only)")
    p.add_argument("--preset", choices=("flash", "pro"), help="built-in V4-Flash/V4-Pro shapes (with --estimate-only)")
    p.add_argument("--table", action="store_true", help="with --estimate-only: size table over all recipes")
    p.add_argument("--ranks", type=_positive(int), default=None, metavar="N",
                   help="with --estimate-only: memory per machine when N machines share the model "
                        "(mlx.launch ... --distributed pipeline|experts)")
    p.add_argument("--verify", metavar="OUT", help="check a converted directory against its config.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _recipe(args) -> Recipe:
    dtype = args.dtype or ("float32" if args.recipe == "none" else "bfloat16")
    return Recipe(args.recipe, args.group_size, args.dense_bits, args.embed_bits, dtype)


def _estimate(args) -> int:
    from ..config import ConfigError, read_config
    from ..convert.convert import load_config
    from ..convert.estimate import estimate_config, rank_lines, rank_table, size_table
    from ..convert.presets import PRESETS

    if args.preset:
        cfg = PRESETS[args.preset]
    elif args.config:
        from ..convert.plan import model_args

        try:
            cfg = read_config(args.config)
        except ConfigError as e:
            raise ConvertError(str(e)) from None
        model_args(cfg, args.config)  # errors name this file
    elif args.hf_path:
        from ..convert.hub import resolve

        cfg = load_config(resolve(args.hf_path, args.revision, allow_patterns=["config.json"]))
    else:
        print("error: --estimate-only needs --preset, --config or --hf-path", file=sys.stderr)
        return 2
    from ..sharding import DistributedError

    try:
        if args.table:
            print(size_table(cfg) if args.ranks is None else rank_table(cfg, args.ranks, args.context))
            return 0
        for line in estimate_config(cfg, _recipe(args), args.context, not args.no_mtp).lines():
            print(line)
        if args.ranks is not None:
            for line in rank_lines(cfg, _recipe(args), args.context, args.ranks):
                print(line)
    except DistributedError as e:
        print(f"error: --ranks {args.ranks}: {e}", file=sys.stderr)
        return 2
    return 0


def run(args) -> int:
    try:
        if args.verify:
            from ..convert.verify import verify_dir

            problems, stats = verify_dir(Path(args.verify))
            for p in problems:
                print(p, file=sys.stderr)
            if problems:
                print(f"verify: {len(problems)} problem(s) in {args.verify}", file=sys.stderr)
                return 1
            print(f"verify: OK, {stats['tensors']} tensors in {stats['files']} files, "
                  f"{format_decimal_bytes(stats['bytes'])}")
            return 0
        if args.ranks is not None and not args.estimate_only:
            print("error: --ranks needs --estimate-only", file=sys.stderr)
            return 2
        if args.estimate_only:
            return _estimate(args)
        if not args.hf_path or not args.mlx_path:
            print("error: convert needs --hf-path and --mlx-path", file=sys.stderr)
            return 2
        from ..convert.convert import convert

        convert(args.hf_path, args.mlx_path, _recipe(args), revision=args.revision,
                include_mtp=not args.no_mtp, shard_gb=args.shard_size, max_size_gb=args.max_size,
                context=args.context, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
        return 0
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
