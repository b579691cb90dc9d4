"""`mlx-dsv4 generate`: one chat turn from the command line, streamed."""

import json
import sys
from pathlib import Path

from .common import (
    THINKING,
    add_draft_arguments,
    add_generation_arguments,
    add_model_argument,
    check_draft_flags,
    check_sampling_flags,
    load_options,
    sampling_from_args,
    text_problem,
)
from .distributed import add_distributed_arguments, distributed_problem


def add_arguments(p):
    add_model_argument(p)
    p.add_argument("--prompt", required=True, help="the user message ('-' reads it from stdin)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--thinking", choices=sorted(THINKING), default="chat",
                   help="chat (default), think (reasoning first) or think-max (reasoning effort max); "
                        "reasoning is shown dimmed on a terminal and goes to stderr when stdout is redirected")
    add_generation_arguments(p)
    p.add_argument("--keep-reasoning", action="store_true",
                   help="keep the reasoning of earlier turns in the prompt (interleaved thinking)")
    p.add_argument("--prompt-cache", type=Path, default=None, metavar="FILE",
                   help="reuse the prefilled prefix stored in FILE; create FILE when it does not exist")
    p.add_argument("--json", action="store_true",
                   help="print the parsed message (reasoning_content, content, tool_calls) as JSON")
    add_draft_arguments(p)
    p.add_argument("--stats", action="store_true",
                   help="after the run, print the monitoring figures (KV cache by layer type, speeds, expert "
                        "routing, active parameters, FLOPs per token, draft acceptance) to stderr; with --json, "
                        "add them to the output as \"stats\"")
    p.add_argument("--verbose", action="store_true",
                   help="print the device and the kernel paths in use (to stderr) before generating")
    add_distributed_arguments(p)


def run(args) -> int:
    from ..config import ConfigError
    from ..console import ProgressBar, Renderer, prefix_length, stats_line, usage
    from ..generate import (
        KVCacheLimitError,
        PromptCache,
        PromptCacheError,
        load_prompt_cache,
        save_prompt_cache,
        stream_generate,
    )
    from ..loader import CheckpointError, load

    problem = check_sampling_flags(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    sampling = sampling_from_args(args).generate_kwargs()
    problem = check_draft_flags(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    problem = distributed_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.distributed:
        return _run_distributed(args, sampling)
    prompt = _read_prompt(args)
    if isinstance(prompt, int):
        return prompt
    text, messages, chat_options = prompt
    thinking_mode = chat_options["thinking_mode"]
    try:
        model, tokenizer = load(args.model, **load_options(args))
        model.set_cache_dtypes(args.kv_dtype, args.index_dtype)
        if args.max_kv_size == "auto":
            from ..device_memory import auto_kv_limit

            args.max_kv_size = auto_kv_limit(model)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    problem = check_draft_flags(args, model)
    if problem:
        print(f"error: {args.model}: {problem}", file=sys.stderr)
        return 1
    if args.verbose:
        print_paths(model)
    routing = None
    if args.stats:
        from ..metrics import RoutingCounter

        routing = RoutingCounter.attach(model)
    cache_file = args.prompt_cache
    prompt_cache, existed = None, False
    try:
        if cache_file is not None:
            existed = cache_file.exists()
            prompt_cache = load_prompt_cache(cache_file, model) if existed else PromptCache(model)
        ids = tokenizer.encode(text)
        marks = [prefix_length(tokenizer, messages, ids, **chat_options)] if prompt_cache is not None else []
        bar = ProgressBar(min_total=args.prefill_step + 1)
        renderer = None if args.json else Renderer(thinking_mode)
        pieces, last = [], None
        steps = stream_generate(
            model, tokenizer, ids, prompt_cache=prompt_cache, progress=bar, prefill_step=args.prefill_step,
            kv_cache_limit=args.max_kv_size, snapshot_at=[m for m in marks if m],
            draft=args.draft, num_draft=args.num_draft, **sampling,
        )
        try:
            for step in steps:
                bar.clear()
                pieces.append(step.text)
                if renderer is not None:
                    renderer.feed(step.text)
                last = step
        except KeyboardInterrupt:
            steps.close()
            bar.clear()
    except (PromptCacheError, KVCacheLimitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    if renderer is not None:
        message = renderer.finish()
    else:
        from ..chat import parse_completion

        parsed = parse_completion("".join(pieces), thinking_mode, strict=False)
        message = {"role": "assistant", "content": parsed["content"],
                   "reasoning_content": parsed["reasoning_content"], "tool_calls": parsed["tool_calls"]}
    reason = last.finish_reason if last is not None and last.finish_reason else "interrupted"
    figures = None
    if routing is not None and last is not None:
        from ..metrics import generation_figures

        figures = generation_figures(model, last, routing, prompt_cache)
    if args.json:
        out = dict(message, finish_reason=reason)
        if last is not None:
            out["usage"] = usage(last)
            if args.draft != "none":
                out["draft"] = {"drafter": args.draft, "num_draft": args.num_draft,
                                "proposed": last.draft_proposed, "accepted": last.draft_accepted,
                                "acceptance_rate": round(last.draft_accepted / last.draft_proposed, 4)
                                if last.draft_proposed else None}
        if figures is not None:
            out["stats"] = figures
        print(json.dumps(out, ensure_ascii=False, indent=2))
    if last is not None:
        print(stats_line(last, reason), file=sys.stderr)
    if figures is not None:
        from ..metrics import format_figures

        for line in format_figures(figures):
            print(line, file=sys.stderr)
    if prompt_cache is not None and not existed and len(prompt_cache):
        try:
            save_prompt_cache(cache_file, prompt_cache)
        except PromptCacheError as e:
            print(f"error: --prompt-cache: {e}", file=sys.stderr)
            return 1
        print(f"saved prompt cache to {cache_file}", file=sys.stderr)
    return 130 if reason == "interrupted" else 0


def _read_prompt(args):
    """(chat text, messages, chat options) of the flags, or the exit status after printing the problem."""
    from ..chat import ChatFormatError, encode_messages

    flag = "--prompt -: standard input" if args.prompt == "-" else "--prompt"
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    except UnicodeDecodeError:
        print(f"error: {flag} is not UTF-8 text", file=sys.stderr)
        return 2
    for name, text in ((flag, prompt), ("--system", args.system)):
        problem = text_problem(text) if text is not None else None
        if problem:
            print(f"error: {name}: {problem}", file=sys.stderr)
            return 2
    thinking_mode, effort = THINKING[args.thinking]
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": prompt})
    chat_options = dict(thinking_mode=thinking_mode, reasoning_effort=effort, keep_reasoning=args.keep_reasoning)
    try:
        return encode_messages(messages, **chat_options), messages, chat_options
    except ChatFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_distributed(args, sampling) -> int:
    """Every rank loads its part; rank 0 reads the prompt, sends the request (token ids and
    sampling) to the others, and alone prints."""
    from ..config import ConfigError
    from ..console import ProgressBar, Renderer, stats_line, usage
    from ..distributed import DistributedError
    from ..generate import KVCacheLimitError, stream_generate
    from ..loader import CheckpointError
    from .distributed import join, report

    try:
        ranks, model, tokenizer = join(args)
    except (CheckpointError, ConfigError, OSError, DistributedError) as e:
        return report(e)
    request = None
    if ranks.rank == 0:
        prompt = _read_prompt(args)
        request = {"error": prompt} if isinstance(prompt, int) else {
            "ids": tokenizer.encode(prompt[0]), "sampling": sampling, "thinking_mode": prompt[2]["thinking_mode"]}
    try:
        request = ranks.broadcast(request)
    except DistributedError as e:
        return report(e)
    if "error" in request:
        return request["error"]
    lead = ranks.rank == 0
    sampling = dict(request["sampling"], stop=tuple(request["sampling"]["stop"]))
    bar = ProgressBar(min_total=args.prefill_step + 1) if lead else None
    renderer = Renderer(request["thinking_mode"]) if lead and not args.json else None
    pieces, last = [], None
    try:
        with ranks.busy("generating"):
            for step in stream_generate(model, tokenizer, request["ids"], progress=bar,
                                        prefill_step=args.prefill_step, kv_cache_limit=args.max_kv_size,
                                        **sampling):
                if bar is not None:
                    bar.clear()
                pieces.append(step.text)
                if renderer is not None:
                    renderer.feed(step.text)
                last = step
    except (KVCacheLimitError, DistributedError) as e:
        return report(e)
    reason = last.finish_reason if last is not None and last.finish_reason else "interrupted"
    if not lead:
        return 0
    if renderer is not None:
        renderer.finish()
    elif args.json:
        from ..chat import parse_completion

        parsed = parse_completion("".join(pieces), request["thinking_mode"], strict=False)
        message = {"role": "assistant", "content": parsed["content"],
                   "reasoning_content": parsed["reasoning_content"], "tool_calls": parsed["tool_calls"]}
        out = dict(message, finish_reason=reason, distributed={"mode": args.distributed, "ranks": ranks.size})
        if last is not None:
            out["usage"] = usage(last)
        print(json.dumps(out, ensure_ascii=False, indent=2))
    if last is not None:
        print(stats_line(last, reason), file=sys.stderr)
    return 130 if reason == "interrupted" else 0


def print_paths(model) -> None:
    """The device and the kernel path each device-dependent step takes (mlx_dsv4.paths)."""
    from ..layers import expert_weights
    from ..paths import device_paths
    from ..streams import parallel_streams

    for what, path in device_paths().describe(len(parallel_streams()), expert_weights(model)):
        print(f"{what}: {path}", file=sys.stderr)
