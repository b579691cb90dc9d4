"""`mlx-dsv4 generate`: one chat turn from the command line, streamed.

Also holds what `mlx-dsv4 chat` shares with it: sampling flags, the streaming
renderer (reasoning dimmed and apart from the answer), the prefill progress bar
and the stats line.
"""

import json
import re
import sys
from pathlib import Path

THINKING = {"chat": ("chat", None), "think": ("thinking", None), "think-max": ("thinking", "max")}

DIM, RESET = "\x1b[2m", "\x1b[0m"

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")


def parse_size(text: str) -> int:
    """Bytes from '8000000', '512MiB', '8GB', '1.5G' (bare K/M/G/T and KiB.. are powers of 1024,
    KB/MB/GB/TB powers of 1000)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 8GiB, 512MB, 1000000)")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    if not unit:
        return int(number)
    power = " KMGT".index(unit)
    decimal = text.strip()[-1] in "bB" and not binary
    return int(number * (1000 if decimal else 1024) ** power)


def _size_arg(text):
    import argparse

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_arguments(p):
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (MLX or Hub float layout)")


def add_sampling_arguments(p):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=1024, help="most tokens to generate (default 1024)")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--prefill-step", type=int, default=2048, help="prompt tokens per prefill chunk")
    g.add_argument("--max-kv-size", type=_size_arg, default=None, metavar="BYTES",
                   help="refuse prompts whose KV cache would exceed this size (e.g. 16GiB)")


def sampling_kwargs(args) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        prefill_step=args.prefill_step,
    )


def format_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class ProgressBar:
    """Prefill progress on stderr, for prompts of more than one chunk, on a terminal only."""

    def __init__(self, stream=None, min_total=1, width=30):
        self.stream = stream or sys.stderr
        self.min_total = min_total
        self.width = width
        self.shown = False
        self.enabled = self.stream.isatty()

    def __call__(self, done, total):
        if not self.enabled or total < self.min_total:
            return
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\rprefill [{bar}] {done}/{total} tokens")
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.shown = False


class Renderer:
    """Streams a completion: reasoning (dimmed on a terminal) apart from the answer.

    The answer goes to ``out``; reasoning goes to ``out`` when it is a terminal and to
    ``err`` otherwise, so a redirected stdout holds only the answer.
    """

    def __init__(self, thinking_mode, out=None, err=None, color=None):
        from .chat import DSMLStreamParser

        self.out = out or sys.stdout
        err = err or sys.stderr
        tty = self.out.isatty()
        self.reasoning_out = self.out if tty else err
        self.color = self.reasoning_out.isatty() if color is None else color
        self.parser = DSMLStreamParser(thinking_mode, strict=False)
        self.thinking_mode = thinking_mode
        self.state = None  # "reasoning" | "content"
        self.text = []

    def _write(self, stream, text):
        stream.write(text)
        stream.flush()

    def feed(self, text):
        from .chat import ContentDelta, ReasoningDelta, ToolCallComplete

        self.text.append(text)
        for event in self.parser.feed(text):
            self._event(event, ContentDelta, ReasoningDelta, ToolCallComplete)

    def _event(self, event, ContentDelta, ReasoningDelta, ToolCallComplete):
        if isinstance(event, ReasoningDelta):
            if self.state != "reasoning":
                self.state = "reasoning"
                if self.color:
                    self._write(self.reasoning_out, DIM)
            self._write(self.reasoning_out, event.text)
        elif isinstance(event, ContentDelta):
            self._end_reasoning()
            if self.state != "content":
                self.state = "content"
            self._write(self.out, event.text)
        elif isinstance(event, ToolCallComplete):
            self._end_reasoning()
            self._write(self.out, f"\n[tool call] {event.name}({event.arguments})")
            self.state = "content"

    def _end_reasoning(self, final=False):
        if self.state == "reasoning":
            if self.color:
                self._write(self.reasoning_out, RESET)
            apart = self.reasoning_out is self.out and not final
            self._write(self.reasoning_out, "\n\n" if apart else "\n")
            self.state = "done-reasoning"

    def finish(self) -> dict:
        """End the stream; return the assistant message parsed from the whole text."""
        from .chat import ContentDelta, ReasoningDelta, ToolCallComplete, parse_completion

        for event in self.parser.finish():
            self._event(event, ContentDelta, ReasoningDelta, ToolCallComplete)
        self._end_reasoning(final=True)
        if self.state == "content":
            self._write(self.out, "\n")
        parsed = parse_completion("".join(self.text), self.thinking_mode, strict=False)
        message = {"role": "assistant", "content": parsed["content"]}
        if parsed["reasoning_content"] is not None:
            message["reasoning_content"] = parsed["reasoning_content"]
        if parsed["tool_calls"]:
            message["tool_calls"] = parsed["tool_calls"]
        return message


def stats_line(step, reason=None) -> str:
    prefilled = step.prompt_tokens - step.cached_tokens
    reason = reason or step.finish_reason
    parts = [
        f"prompt {step.prompt_tokens} tokens ({prefilled} prefilled, {step.cached_tokens} cached) "
        f"at {step.prompt_tps:.1f} tok/s",
        f"generated {step.generation_tokens} tokens at {step.generation_tps:.1f} tok/s",
        f"cache {format_bytes(step.cache_bytes)}",
        f"peak memory {format_bytes(step.peak_memory)}",
    ]
    if reason != "stop":
        parts.append(f"finish: {reason}")
    return " | ".join(parts)


def usage(step) -> dict:
    return {
        "prompt_tokens": step.prompt_tokens,
        "cached_tokens": step.cached_tokens,
        "completion_tokens": step.generation_tokens,
        "prompt_tps": round(step.prompt_tps, 3),
        "generation_tps": round(step.generation_tps, 3),
        "peak_memory": step.peak_memory,
        "cache_bytes": step.cache_bytes,
    }


def prefix_length(tokenizer, messages, ids, **chat_options) -> int:
    """Length of the token prefix covering the system message(s), if ``ids`` starts with it."""
    from .chat import encode_messages

    head = []
    for m in messages:
        if m.get("role") != "system":
            break
        head.append(m)
    if not head:
        return 0
    prefix = tokenizer.encode(encode_messages(head, add_generation_prompt=False, **chat_options))
    return len(prefix) if 0 < len(prefix) < len(ids) and ids[: len(prefix)] == prefix else 0


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the user message ('-' reads it from stdin)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--thinking", choices=sorted(THINKING), default="chat",
                   help="chat (default), think (reasoning first) or think-max (reasoning effort max); "
                        "reasoning is shown dimmed on a terminal and goes to stderr when stdout is redirected")
    add_sampling_arguments(p)
    p.add_argument("--prompt-cache", type=Path, default=None, metavar="FILE",
                   help="reuse the prefilled prefix stored in FILE; create FILE when it does not exist")
    p.add_argument("--json", action="store_true",
                   help="print the parsed message (reasoning_content, content, tool_calls) as JSON")


def run(args) -> int:
    from .chat import ChatFormatError, encode_messages
    from .generate import (
        KVCacheLimitError,
        PromptCache,
        PromptCacheError,
        load_prompt_cache,
        save_prompt_cache,
        stream_generate,
    )
    from .loader import CheckpointError, load
    from .config import ConfigError

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    thinking_mode, effort = THINKING[args.thinking]
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": prompt})
    chat_options = dict(thinking_mode=thinking_mode, reasoning_effort=effort)
    try:
        text = encode_messages(messages, **chat_options)
    except ChatFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load(args.model)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

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
            model, tokenizer, ids, seed=args.seed, prompt_cache=prompt_cache, progress=bar,
            kv_cache_limit=args.max_kv_size, snapshot_at=[m for m in marks if m], **sampling_kwargs(args),
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
        from .chat import parse_completion

        parsed = parse_completion("".join(pieces), thinking_mode, strict=False)
        message = {"role": "assistant", "content": parsed["content"],
                   "reasoning_content": parsed["reasoning_content"], "tool_calls": parsed["tool_calls"]}
    reason = last.finish_reason if last is not None and last.finish_reason else "interrupted"
    if args.json:
        out = dict(message, finish_reason=reason)
        if last is not None:
            out["usage"] = usage(last)
        print(json.dumps(out, ensure_ascii=False, indent=2))
    if last is not None:
        print(stats_line(last, reason), file=sys.stderr)
    if prompt_cache is not None and not existed and len(prompt_cache):
        save_prompt_cache(cache_file, prompt_cache)
        print(f"saved prompt cache to {cache_file}", file=sys.stderr)
    return 130 if reason == "interrupted" else 0
