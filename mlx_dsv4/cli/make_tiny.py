"""`mlx-dsv4 make-tiny`: a small random checkpoint in the official Hub layout."""

from ..tiny import PRESETS


def add_arguments(p):
    p.add_argument("out", help="output directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="flash")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--layers", type=str, default=None,
                   help="comma-separated compress ratios per layer (each 0, 4 or 128), e.g. 0,0,4,128")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--dspark", action="store_true",
                   help="the mtp.* tensors are a DSpark drafter (dspark_* config keys, two stages) instead of "
                        "an MTP layer: for --draft dspark")
    p.add_argument("--mlx-lm", action="store_true",
                   help="also write what mlx-lm needs to open the directory (model file, chat template, "
                        "tokenizer files; load it with --trust-remote-code)")


def run(args):
    from ..tiny import write_tiny_checkpoint

    overrides = {}
    if args.layers:
        overrides["compress_ratios"] = [int(r) for r in args.layers.split(",")]
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    out = write_tiny_checkpoint(args.out, preset=args.preset, seed=args.seed, dtype=args.dtype,
                                mlx_lm=args.mlx_lm, dspark=args.dspark, **overrides)
    print(f"wrote tiny DeepSeek-V4 checkpoint to {out}")
    return 0
