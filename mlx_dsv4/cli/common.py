"""Arguments several subcommands take: the model, sampling flags, sizes, thinking modes."""

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Optional

from ..memory import INDEX_DTYPES, KV_DTYPES
from ..sampling import SamplingParams
from ..sizes import parse_size

# --thinking value -> (encode_messages thinking_mode, reasoning_effort)
THINKING = {"chat": ("chat", None), "think": ("thinking", None), "think-max": ("thinking", "max")}

DEFAULT_SAMPLING = SamplingParams(max_tokens=1024)  # generate and chat

DRAFTERS = ("none", "mtp", "dspark")  # mlx_dsv4.generate.DRAFTERS, named here without importing MLX
DEFAULT_NUM_DRAFT = 3

DEFAULT_PROMPT_CACHE_BYTES = 2 << 30
DEFAULT_PROMPT_CACHE_DISK_BYTES = 16 << 30


def positive_int(text: str) -> int:
    """argparse type for a count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def size_argument(text: str) -> int:
    """argparse type for a byte size (see mlx_dsv4.sizes.parse_size)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def kv_limit_argument(text: str):
    """--max-kv-size: a byte size, or "auto" (the memory left after the weights, known once loaded)."""
    return "auto" if text == "auto" else size_argument(text)


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
    p.add_argument("--prefill-step", type=positive_int, default=2048,
                   help="prompt tokens per prefill chunk (default 2048)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="fp8",
                   help="KV cache rows: fp8 (as V4 was trained: E4M3, RoPE dims in bf16), bf16, or float "
                        "(the activation dtype) (default fp8)")
    p.add_argument("--index-dtype", choices=INDEX_DTYPES, default="fp4",
                   help="indexer keys: fp4 (as trained: Hadamard-rotated FP4), fp8, bf16 or float (default fp4)")
    p.add_argument("--max-kv-size", type=kv_limit_argument, default=None, metavar="SIZE",
                   help=f"memory guard: refuse {what} whose KV cache plus prefill working memory would exceed SIZE "
                        "(8G = 8GiB = 2^33 bytes, 8GB = 8*10^9 bytes, a plain number is bytes; auto: the "
                        "memory the machine can keep resident after the weights)")


def add_prompt_cache_arguments(p):
    """serve and chat: the prefix store of prompt caches, in memory and on disk."""
    p.add_argument("--prompt-cache-bytes", type=size_argument, default=DEFAULT_PROMPT_CACHE_BYTES, metavar="SIZE",
                   help="memory for prompt-cache snapshots of all conversations; the least recently used "
                        "leave memory first (default 2G)")
    p.add_argument("--prompt-cache-dir", default=None, metavar="DIR",
                   help="folder where snapshots are kept across restarts (default: "
                        "~/.cache/mlx-dsv4/prompt-cache, or $XDG_CACHE_HOME/mlx-dsv4/prompt-cache); 'none': memory only")
    p.add_argument("--prompt-cache-disk-bytes", type=size_argument, default=DEFAULT_PROMPT_CACHE_DISK_BYTES,
                   metavar="SIZE", help="most disk the folder may take; the least recently used files go first "
                                        "(default 16G)")


def prefix_store_options(args) -> dict:
    """The keyword arguments of ``PrefixStore`` the flags of add_prompt_cache_arguments give."""
    from ..prefix_store import default_directory

    directory = args.prompt_cache_dir
    if directory is None:
        directory = default_directory()
    elif directory.lower() == "none":
        directory = None
    return {"memory_bytes": args.prompt_cache_bytes, "directory": directory,
            "disk_bytes": args.prompt_cache_disk_bytes}


def add_generation_arguments(p, *, what="prompts"):
    """generate and chat: sampling flags with their defaults, --prefill-step, --max-kv-size."""
    add_sampling_arguments(p, DEFAULT_SAMPLING)
    add_memory_arguments(p, what=what)


def add_draft_arguments(p, *, what="the reply"):
    """--draft and --num-draft: speculative decoding (generate, chat, serve)."""
    p.add_argument("--draft", choices=DRAFTERS, default="none",
                   help=f"speculative decoding of {what}: mtp drafts tokens with the checkpoint's MTP layer and the "
                        "model verifies them (greedy: the output of plain greedy decoding; sampled: its "
                        "distribution); dspark the same with the checkpoint's DSpark drafter (V4-Flash-0731); "
                        "none (default) decodes one token per forward pass")
    p.add_argument("--num-draft", type=int, default=DEFAULT_NUM_DRAFT, metavar="N",
                   help=f"tokens the drafter proposes per model forward pass with --draft (1..8, default "
                        f"{DEFAULT_NUM_DRAFT}; with dspark at most the checkpoint's dspark_block_size)")


def draft_flag(error) -> str:
    """A draft problem (a GenerationParameterError of check_draft) worded with the flags."""
    if error.field == "num_draft":
        return f"--num-draft {error.problem}"
    return f"--draft {error.problem}".replace(
        "logits processors (repetition penalty)", "logits processors (--repetition-penalty)").replace(
        "use draft 'dspark'", "use --draft dspark")


def check_draft_flags(args, model=None) -> Optional[str]:
    """The problem with --draft / --num-draft and the sampling flags, naming the flag, or None;
    with ``model`` (loaded with ``load_options``) also whether it has the drafter."""
    from ..generate import GenerationParameterError, check_draft

    sampling = sampling_from_args(args)
    try:
        check_draft(model, args.draft, args.num_draft, temperature=sampling.temperature,
                    repetition_penalty=sampling.repetition_penalty)
    except GenerationParameterError as e:
        return draft_flag(e)
    return None


def load_options(args) -> dict:
    """Keyword arguments of ``mlx_dsv4.load`` the flags need: the checkpoint's mtp.* tensors (the MTP
    layer or the DSpark drafter) for --draft mtp or dspark."""
    return {"mtp": getattr(args, "draft", "none") in ("mtp", "dspark")}


def sampling_from_args(args) -> SamplingParams:
    """The SamplingParams the flags of add_sampling_arguments give."""
    given = {f.name: getattr(args, f.name) for f in fields(SamplingParams) if hasattr(args, f.name)}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    return SamplingParams(**given)


def text_problem(text: str) -> Optional[str]:
    """Why ``text`` is not Unicode text the tokenizer takes, or None. Bytes that are not UTF-8
    reach Python as lone surrogates (command-line arguments, standard input)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not UTF-8 text (character {e.start} comes from a byte that is not UTF-8)"
    return None


def sampling_flag(field: str) -> str:
    """The flag of add_sampling_arguments whose destination is ``field``."""
    return "--temp" if field == "temperature" else "--" + field.replace("_", "-")


def check_sampling_flags(args) -> Optional[str]:
    """The problem with the first sampling flag that generation cannot use, naming the flag, or
    None. The vocabulary size (the bound of --top-k) comes from --model's config, so the check
    needs no weights; a config that does not read leaves that bound to loading to report."""
    from ..config import ConfigError, ModelArgs
    from ..generate import GenerationParameterError, check_sampling_parameters

    try:
        vocab_size = ModelArgs.from_path(args.model).vocab_size
    except (ConfigError, OSError):
        vocab_size = None
    try:
        check_sampling_parameters(None, vocab_size=vocab_size, **sampling_from_args(args).generate_kwargs())
    except GenerationParameterError as e:
        return f"{sampling_flag(e.field)} {e.problem}"
    return None
