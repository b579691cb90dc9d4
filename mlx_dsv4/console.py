"""Generation on a terminal: the streaming renderer (reasoning dimmed and apart from the
answer), the prefill progress bar, the stats line and usage figures of a finished run."""

import sys
import time

from .sizes import format_bytes

DIM, RESET = "\x1b[2m", "\x1b[0m"


def format_duration(seconds: float) -> str:
    """'42s', '3m05s' or '2h07m'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressBar:
    """Prefill progress on stderr, for prompts of more than one chunk, on a terminal only: tokens
    done, tokens per second since the bar was made, and the time left at that rate."""

    def __init__(self, stream=None, min_total=1, width=30, clock=time.perf_counter):
        self.stream = stream or sys.stderr
        self.min_total = min_total
        self.width = width
        self.shown = False
        self.enabled = self.stream.isatty()
        self.clock = clock
        self.started = clock()

    def __call__(self, done, total):
        if not self.enabled or total < self.min_total:
            return
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        line = f"\rprefill [{bar}] {done}/{total} tokens"
        elapsed = self.clock() - self.started
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            line += f", {rate:.0f} tok/s"
            if done < total:
                line += f", ETA {format_duration((total - done) / rate)}"
        self.stream.write(line + "\x1b[K")
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
