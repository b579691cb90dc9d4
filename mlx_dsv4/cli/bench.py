"""`mlx-dsv4 bench`: long-context speed and memory, side by side with the baselines (mlx_dsv4.bench)."""

import sys

from ..bench import DEFAULT_CONTEXTS, DEFAULT_RATIOS, FLASH_DIMS, IMPLS
from ..bench_speculative import DEFAULT_ACCEPTANCES, DEFAULT_DRAFTS, DEFAULT_SPEC_CONTEXTS, DEFAULT_SPEC_STEPS


def add_arguments(p) -> None:
    g = p.add_argument_group("model (V4-Flash per-layer dimensions by default)")
    g.add_argument("--checkpoint", default=None,
                   help="use this official-layout checkpoint directory instead of building one")
    g.add_argument("--checkpoint-dir", default=None,
                   help="where built checkpoints are kept and reused (default ~/.cache/mlx-dsv4/bench)")
    g.add_argument("--layers", default=DEFAULT_RATIOS,
                   help="compress ratio per layer, comma-separated (0, 4 or 128), or a layer count N "
                        f"for N layers alternating CSA/HCA (default {DEFAULT_RATIOS})")
    g.add_argument("--experts", type=int, default=4, help="routed experts per layer (default 4)")
    g.add_argument("--experts-per-token", type=int, default=2, help="active routed experts (default 2)")
    g.add_argument("--vocab-size", type=int, default=32768,
                   help="vocabulary (default 32768; V4's is 129280, which only adds the same "
                        "embedding/head cost to every implementation)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="weights' dtype (default bfloat16; float32 with --speculative)")
    g.add_argument("--seed", type=int, default=0)
    for key, value in FLASH_DIMS.items():
        g.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=value,
                       help=f"default {value}")
    r = p.add_argument_group("measurement")
    r.add_argument("--contexts", default=None,
                   help=f"prompt lengths to measure, comma-separated (default {DEFAULT_CONTEXTS}; with "
                        f"--speculative {DEFAULT_SPEC_CONTEXTS}; k/K suffix allowed, e.g. 1k,8k,32k)")
    r.add_argument("--cpu-streams", type=int, default=None,
                   help="CPU backend: run our model's independent work on up to N streams, one per core "
                        "(experimental; default: $MLX_DSV4_CPU_STREAMS or 1)")
    r.add_argument("--decode-steps", type=int, default=None,
                   help=f"timed decode steps per context (default 16; with --speculative {DEFAULT_SPEC_STEPS})")
    r.add_argument("--chunk", type=int, default=2048, help="prefill chunk size (default 2048)")
    r.add_argument("--impls", default=",".join(IMPLS), help=f"implementations to run (default {','.join(IMPLS)})")
    r.add_argument("--kv-dtype", default="fp8", help="our cache's kv storage (default fp8)")
    r.add_argument("--index-dtype", default="fp4", help="our cache's indexer-key storage (default fp4)")
    r.add_argument("--naive-max-gb", type=float, default=8.0,
                   help="skip the naive baseline at contexts where its dense score block alone would "
                        "exceed this many GiB (default 8)")
    r.add_argument("--naive-max-context", type=int, default=None,
                   help="skip the naive baseline above this context (its dense attention grows with the "
                        "square of the context; default: no limit)")
    r.add_argument("--vlm-max-context", type=int, default=None,
                   help="skip the mlx-vlm baseline above this context (default: no limit)")
    r.add_argument("--bandwidth-mb", type=int, default=512, help="array size for the bandwidth probe (default 512)")
    r.add_argument("--json", dest="json_out", default=None, help="also write all figures to this JSON file")
    r.add_argument("--plot", default=None, metavar="PATH",
                   help="also draw tok/s and memory against context into this PNG (needs matplotlib)")
    s = p.add_argument_group("speculative decoding (--speculative)")
    s.add_argument("--speculative", action="store_true",
                   help="measure plain greedy decode against speculative decode with the MTP layer instead "
                        "(default checkpoint: the tiny trained one, prompted with key-value lookups)")
    s.add_argument("--acceptance", default=DEFAULT_ACCEPTANCES,
                   help=f"forced acceptance rates to measure (default {DEFAULT_ACCEPTANCES}); the drafter's own "
                        "proposals are measured too")
    s.add_argument("--num-draft", dest="spec_drafts", default=DEFAULT_DRAFTS,
                   help=f"tokens drafted per round to measure, comma-separated (default {DEFAULT_DRAFTS})")
    s.add_argument("--no-vlm", action="store_true", help="skip mlx-vlm's plain decode")


def run(args) -> int:
    from ..bench import run_benchmark

    try:
        if args.speculative:
            from ..bench import parse_contexts
            from ..bench_speculative import run_speculative

            args.spec_contexts = parse_contexts(args.contexts or DEFAULT_SPEC_CONTEXTS)
            args.dtype = args.dtype or "float32"
            summary = run_speculative(args)
            if args.json_out:
                import json
                from pathlib import Path

                Path(args.json_out).write_text(json.dumps(summary, indent=1))
            return 0
        run_benchmark(args)
    except ValueError as e:
        print(f"mlx-dsv4 bench: {e}", file=sys.stderr)
        return 2
    return 0
