"""Arguments several subcommands take: the model, sampling flags, sizes, thinking modes."""

import argparse
from dataclasses import fields
from pathlib import Path

from ..sampling import SamplingParams
from ..sizes import parse_size

# --thinking value -> (encode_messages thinking_mode, reasoning_effort)
THINKING = {"chat": ("chat", None), "think": ("thinking", None), "think-max": ("thinking", "max")}

DEFAULT_SAMPLING = SamplingParams(max_tokens=1024)  # generate and chat


def size_argument(text: str) -> int:
    """argparse type for a byte size (see mlx_dsv4.sizes.parse_size)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_argument(p, help="checkpoint directory (MLX or Hub float layout)"):
    p.add_argument("--model", required=True, type=Path, help=help)


def add_sampling_arguments(p, defaults: SamplingParams, *, per_run=True, title="sampling"):
    """Flags whose destinations are the fields of SamplingParams (see sampling_from_args).

    per_run: also --seed and --stop (a server takes those from each request instead)."""
    g = p.add_argument_group(title)
    g.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                   help=f"most tokens to generate (default {defaults.max_tokens})")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=defaults.temperature,
                   metavar="T", help=f"temperature; 0 is greedy (default {defaults.temperature:g})")
    g.add_argument("--top-p", type=float, default=defaults.top_p,
                   help=f"nucleus sampling mass (default {defaults.top_p:g})")
    g.add_argument("--top-k", type=int, default=defaults.top_k, help=f"top-k, 0: off (default {defaults.top_k})")
    g.add_argument("--min-p", type=float, default=defaults.min_p, help=f"min-p, 0: off (default {defaults.min_p:g})")
    g.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    if per_run:
        g.add_argument("--seed", type=int, default=defaults.seed)
        g.add_argument("--stop", action="append", default=list(defaults.stop), help="stop string (repeatable)")


def add_memory_arguments(p, *, what="prompts"):
    p.add_argument("--prefill-step", type=int, default=2048, help="prompt tokens per prefill chunk (default 2048)")
    p.add_argument("--max-kv-size", type=size_argument, default=None, metavar="SIZE",
                   help=f"memory guard: refuse {what} whose KV cache would exceed SIZE "
                        "(8G = 8GiB = 2^33 bytes, 8GB = 8*10^9 bytes, a plain number is bytes)")


def add_generation_arguments(p, *, what="prompts"):
    """generate and chat: sampling flags with their defaults, --prefill-step, --max-kv-size."""
    add_sampling_arguments(p, DEFAULT_SAMPLING)
    add_memory_arguments(p, what=what)


def sampling_from_args(args) -> SamplingParams:
    """The SamplingParams the flags of add_sampling_arguments give."""
    given = {f.name: getattr(args, f.name) for f in fields(SamplingParams) if hasattr(args, f.name)}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    return SamplingParams(**given)
