"""`--distributed pipeline|experts`: a subcommand run on every rank of `mlx.launch`.

Rank 0 owns the terminal (or the HTTP port) and sends each request to the other ranks, which
run the same generation silently."""

import signal
import sys

MODES = ("pipeline", "experts")


def add_distributed_arguments(p):
    g = p.add_argument_group("several machines (start every rank with mlx.launch)")
    g.add_argument("--distributed", choices=MODES, default=None,
                   help="pipeline: each rank holds a run of layers; experts: each rank holds a share of every "
                        "MoE layer's routed experts")
    g.add_argument("--pipeline-split", default=None, metavar="N,N,...",
                   help="layers per rank with --distributed pipeline (default: split by the layers' bytes)")


def distributed_problem(args) -> str:
    """Why the flags cannot run distributed, or ''."""
    if args.distributed is None:
        return "--pipeline-split needs --distributed pipeline" if args.pipeline_split else ""
    if args.pipeline_split and args.distributed != "pipeline":
        return "--pipeline-split needs --distributed pipeline"
    if getattr(args, "draft", "none") != "none":
        return "--draft does not run with --distributed"
    if getattr(args, "prompt_cache", None) is not None:
        return "--prompt-cache does not run with --distributed"
    if getattr(args, "max_kv_size", None) == "auto":
        return "--max-kv-size auto does not run with --distributed (give a size)"
    return ""


def join(args):
    """(Ranks, model, tokenizer) of this rank; followers leave Ctrl-C to rank 0, whose exit
    ends them."""
    from ..distributed import init, load_distributed
    from ..tokenizer import load_tokenizer

    ranks = init()
    if ranks.rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    model = load_distributed(args.model, ranks, args.distributed, args.pipeline_split)
    model.set_cache_dtypes(getattr(args, "kv_dtype", "fp8"), getattr(args, "index_dtype", "fp4"))
    return ranks, model, load_tokenizer(args.model)


def report(error) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 1
