"""`mlx-dsv4 chat`: an interactive conversation that keeps its prompt cache between turns."""

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from ..sizes import format_bytes
from .common import (
    THINKING,
    add_draft_arguments,
    add_generation_arguments,
    add_model_argument,
    add_prompt_cache_arguments,
    check_draft_flags,
    check_sampling_flags,
    load_options,
    sampling_from_args,
    text_problem,
)
from .distributed import add_distributed_arguments, distributed_problem

CHAT_PARTITION = "local"  # chat sessions share their prefixes with each other, not with served requests

HELP = """commands:
  /think [chat|think|think-max]  toggle reasoning (or pick a mode)
  /reset                         forget the conversation and its cache
  /save FILE                     save the conversation and its prompt cache
  /load FILE                     resume a conversation saved with /save
  /tools [FILE|off]              list the tools, load OpenAI tool definitions from a JSON file, or drop them
  /stats                         KV cache by layer type, speeds, expert routing, FLOPs of the last reply
  /help                          this text
  /quit                          leave (Ctrl-D works too)
Ctrl-C stops a reply and keeps what was generated. Tool calls are shown, not run
(the agent loop runs tools)."""


def add_arguments(p):
    add_model_argument(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--thinking", choices=sorted(THINKING), default="chat", help="initial reasoning mode")
    p.add_argument("--keep-reasoning", action="store_true",
                   help="keep the reasoning of earlier turns in the prompt (interleaved thinking)")
    p.add_argument("--tools", type=Path, default=None, help="JSON file with OpenAI tool definitions")
    add_generation_arguments(p, what="turns")
    add_prompt_cache_arguments(p)
    add_draft_arguments(p, what="each reply")
    add_distributed_arguments(p)
    p.add_argument("--on-overflow", choices=["error", "drop_oldest"], default="error",
                   help="with --max-kv-size: refuse a turn that does not fit, or drop the oldest turns")
    p.add_argument("--history-file", type=Path, default=None,
                   help="readline history (default ~/.mlx_dsv4_history)")


def load_tools(path) -> list:
    """The OpenAI tool definitions in the JSON file ``path``; ValueError naming the file and the problem."""
    from ..chat import ChatFormatError, render_tools_block

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of tools (or an object with a 'tools' list)")
    try:
        render_tools_block(data)  # validates
    except ChatFormatError as e:
        raise ValueError(f"{path}: {e}") from None
    return data


def _tool_name(tool):
    return tool.get("function", tool).get("name", "?")


def _conversation(system, tools, messages) -> list:
    head = [{"role": "system", "content": system}] if system else []
    if tools and not head:
        head = [{"role": "system", "content": ""}]
    if head and tools:
        head[0]["tools"] = tools
    return head + messages


def _saved_conversation(state, mode) -> dict:
    """The conversation /save stored (messages, system, thinking mode, default ``mode``, and
    tools), checked: ValueError names what is wrong."""
    from ..chat import ChatFormatError, encode_messages

    if not isinstance(state, dict):
        raise ValueError(f"the saved conversation must be an object, got {type(state).__name__}")
    messages, system = state.get("messages"), state.get("system")
    thinking, tools = state.get("thinking", mode), state.get("tools")
    if not isinstance(messages, list):
        raise ValueError(f"the saved messages must be a list, got {type(messages).__name__}")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"the saved system prompt must be text, got {type(system).__name__}")
    if not isinstance(thinking, str) or thinking not in THINKING:
        raise ValueError(f"unknown saved thinking mode {thinking!r}")
    thinking_mode, effort = THINKING[thinking]
    conversation = _conversation(system, tools, messages)
    try:
        if conversation:
            encode_messages(conversation, thinking_mode=thinking_mode, reasoning_effort=effort,
                            add_generation_prompt=False)
    except ChatFormatError as e:
        raise ValueError(f"the saved conversation cannot be encoded: {e}") from None
    return {"messages": messages, "system": system, "thinking": thinking, "tools": tools}


class ChatSession:
    def __init__(self, model, tokenizer, args, out=None, err=None, tools=None, ranks=None):
        from ..prefix_store import PrefixStore
        from .common import prefix_store_options

        self.model, self.tokenizer, self.args = model, tokenizer, args
        # With --distributed, rank 0's session sends each turn to the other ranks; no prompt
        # cache (the ranks would have to keep their snapshots in lockstep).
        self.ranks = ranks
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.mode = args.thinking
        self.system = args.system
        self.tools = tools
        self.messages = []
        options = prefix_store_options(args) if hasattr(args, "prompt_cache_bytes") else {"memory_bytes": 1 << 30}
        self.prompt_cache = None if ranks is not None else PrefixStore(model, **options).view(CHAT_PARTITION)
        from ..metrics import RoutingCounter

        self.routing = RoutingCounter.attach(model)  # for /stats
        self.last_step = None

    def say(self, text=""):
        self.out.write(text + "\n")
        self.out.flush()

    def conversation(self):
        return _conversation(self.system, self.tools, self.messages)

    def draft_options(self) -> dict:
        """stream_generate's draft arguments of the --draft and --num-draft flags."""
        draft = getattr(self.args, "draft", "none")
        return {"draft": draft, "num_draft": self.args.num_draft} if draft != "none" else {}

    # -- commands ------------------------------------------------------------

    def command(self, line) -> bool:
        """Run a slash command; False when the session should end."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/think":
            if rest and rest not in THINKING:
                self.say(f"unknown mode {rest!r}; use one of {', '.join(sorted(THINKING))}")
            else:
                self.mode = rest or ("chat" if self.mode != "chat" else "think")
                self.say(f"[thinking mode: {self.mode}]")
        elif name in ("/save", "/load") and self.ranks is not None:
            self.say(f"{name} needs the prompt cache, which --distributed does not keep")
        elif name == "/reset":
            self.messages = []
            if self.prompt_cache is not None:
                self.prompt_cache.clear()
            self.say("[conversation and cache cleared]")
        elif name == "/save":
            self.save(rest)
        elif name == "/load":
            self.load(rest)
        elif name == "/tools":
            self.tools_command(rest)
        elif name == "/stats":
            self.stats()
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def stats(self):
        from ..metrics import format_figures, generation_figures

        if self.last_step is None:
            self.say("[no reply yet: /stats shows the figures of the last reply]")
            return
        figures = generation_figures(self.model, self.last_step, self.routing, self.prompt_cache)
        self.say("\n".join(format_figures(figures)))

    def save(self, path):
        from ..generate import PromptCacheError, save_prompt_cache

        if not path:
            self.say("usage: /save FILE")
            return
        if not len(self.prompt_cache):
            self.say("nothing to save yet")
            return
        state = {"messages": self.messages, "system": self.system, "thinking": self.mode, "tools": self.tools}
        try:
            save_prompt_cache(path, self.prompt_cache.export(), metadata={"chat": state})
        except PromptCacheError as e:
            self.say(f"error: {e}")
            return
        tokens = len(self.prompt_cache.tokens)
        self.say(f"[saved {len(self.messages)} messages and a cache of {tokens} tokens to {path}]")

    def load(self, path):
        from ..generate import PromptCacheError, load_prompt_cache

        if not path:
            self.say("usage: /load FILE")
            return
        try:
            pc = load_prompt_cache(path, self.model, strict=False)
        except PromptCacheError as e:
            self.say(f"error: {e}")
            return
        if "chat" not in pc.metadata:
            self.say(f"error: {path} holds a prompt cache but no conversation (not saved by /save)")
            return
        try:
            state = _saved_conversation(pc.metadata["chat"], self.mode)
        except ValueError as e:
            self.say(f"error: {path}: {e}")
            return
        self.prompt_cache.adopt(pc)
        self.messages = state["messages"]
        self.system = state["system"]
        self.mode = state["thinking"]
        self.tools = state["tools"]
        self.say(f"[loaded {len(self.messages)} messages and a cache of {len(self.prompt_cache.tokens)} tokens; "
                 f"thinking mode {self.mode}]")

    def tools_command(self, rest):
        if rest == "off":
            self.tools = None
            self.say("[tools removed]")
        elif rest:
            try:
                self.tools = load_tools(rest)
            except ValueError as e:
                self.say(f"error: {e}")
                return
            self.say(f"[{len(self.tools)} tool(s): {', '.join(_tool_name(t) for t in self.tools)}]")
        elif self.tools:
            for tool in self.tools:
                fn = tool.get("function", tool)
                self.say(f"  {fn.get('name')}: {fn.get('description', '')}")
        else:
            self.say("[no tools; /tools FILE loads OpenAI tool definitions]")

    # -- a turn --------------------------------------------------------------

    def turn(self, user_text):
        from ..chat import ChatFormatError
        from ..console import ProgressBar, Renderer, prefix_length
        from ..generate import KVCacheLimitError, PromptCacheError, fit_messages, stream_generate

        problem = text_problem(user_text)
        if problem:
            self.say(f"error: the message is {problem}; nothing was sent")
            return
        thinking_mode, effort = THINKING[self.mode]
        options = dict(thinking_mode=thinking_mode, reasoning_effort=effort,
                       keep_reasoning=getattr(self.args, "keep_reasoning", False))
        self.messages.append({"role": "user", "content": user_text})
        args = self.args
        try:
            kept, ids = fit_messages(
                self.model, self.tokenizer, self.conversation(), max_tokens=args.max_tokens,
                kv_cache_limit=args.max_kv_size, on_overflow=args.on_overflow, prefill_step=args.prefill_step,
                prompt_cache=self.prompt_cache, **options,
            )
        except (ChatFormatError, KVCacheLimitError) as e:
            self.messages.pop()
            self.say(f"error: {e}")
            return
        dropped = len(self.conversation()) - len(kept)
        if dropped:
            self.messages = self.messages[dropped:]
            self.say(f"[dropped the {dropped} oldest message(s) to fit --max-kv-size]")
        marks = [prefix_length(self.tokenizer, kept, ids, **options)] if self.prompt_cache is not None else []
        bar = ProgressBar(stream=self.err, min_total=args.prefill_step + 1)
        renderer = Renderer(thinking_mode, out=self.out, err=self.err)
        last, interrupted = None, False
        sampling = sampling_from_args(args).generate_kwargs()
        if self.ranks is not None:
            self.ranks.broadcast({"ids": list(ids), "options": sampling, "partition": ""})
        steps = stream_generate(
            self.model, self.tokenizer, ids, prompt_cache=self.prompt_cache, progress=bar,
            prefill_step=args.prefill_step, snapshot_at=[m for m in marks if m], **sampling,
            **self.draft_options(),
        )
        try:
            with _interrupt_between_tokens(self.ranks is not None) as interrupt:
                for step in steps:
                    bar.clear()
                    renderer.feed(step.text)
                    last = step
                    # every rank ends the reply at the same token: after Ctrl-C on rank 0, at the next one
                    if self.ranks is not None and self.ranks.stop_agreed(interrupt.is_set()):
                        steps.close()
                        interrupted = step.finish_reason is None
                        break
        except KeyboardInterrupt:
            steps.close()
            interrupted = True
        except PromptCacheError as e:
            self.messages.pop()
            self.say(f"error: {e}")
            return
        finally:
            bar.clear()
        message = renderer.finish()
        self.messages.append(message)
        self.last_step = last or self.last_step
        if last is None:
            self.say("[interrupted]")
            return
        prefilled = last.prompt_tokens - last.cached_tokens
        parts = [
            f"{prefilled} new prompt tokens prefilled, {last.cached_tokens} cached",
            f"{last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s",
            f"prompt {last.prompt_tps:.1f} tok/s",
            f"cache {format_bytes(last.cache_bytes)}",
        ]
        if last.draft_proposed:
            parts.append(f"draft {last.draft_accepted}/{last.draft_proposed} accepted")
        reason = "interrupted" if interrupted else last.finish_reason
        if reason != "stop":
            parts.append(reason)
        self.say("[" + " | ".join(parts) + "]")


@contextmanager
def _interrupt_between_tokens(enabled):
    """With ``enabled``, Ctrl-C only sets the event yielded (checked between tokens), so no rank
    is left waiting in the middle of a forward pass; otherwise it raises KeyboardInterrupt."""
    event = threading.Event()
    if not enabled:
        yield event
        return
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def _setup_readline(history_file):
    try:
        import readline
    except ImportError:
        return None
    path = Path(history_file or os.environ.get("MLX_DSV4_HISTORY", Path.home() / ".mlx_dsv4_history"))
    try:
        readline.read_history_file(str(path))
    except FileNotFoundError:
        pass  # the first session
    except OSError as e:
        print(f"error: cannot read the history file {path}: {e.strerror or e}", file=sys.stderr)
    readline.set_history_length(1000)

    def save():
        try:
            readline.write_history_file(str(path))
        except OSError as e:
            reason = e.strerror or str(e)
            if isinstance(e, FileNotFoundError) and not path.parent.is_dir():
                reason = f"the folder {path.parent} does not exist"
            print(f"error: cannot write the history file {path}: {reason}", file=sys.stderr)

    return save


def run(args) -> int:
    from ..config import ConfigError
    from ..loader import CheckpointError, load

    problem = check_sampling_flags(args) or check_draft_flags(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        tools = load_tools(args.tools) if args.tools else None
    except ValueError as e:
        print(f"error: --tools: {e}", file=sys.stderr)
        return 1
    if args.system is not None:
        from ..chat import ChatFormatError, encode_messages

        problem = text_problem(args.system)
        if problem is None:
            try:
                encode_messages([{"role": "system", "content": args.system}])
            except ChatFormatError as e:
                problem = str(e)
        if problem:
            print(f"error: --system: {problem}", file=sys.stderr)
            return 2
    problem = distributed_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ranks = None
    try:
        if args.distributed:
            from ..distributed import DistributedError
            from .distributed import join

            try:
                ranks, model, tokenizer = join(args)
            except DistributedError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            if ranks.rank != 0:
                return _follow(args, ranks, model, tokenizer)
        else:
            model, tokenizer = load(args.model, **load_options(args))
            model.set_cache_dtypes(args.kv_dtype, args.index_dtype)
            problem = check_draft_flags(args, model)
            if problem:
                print(f"error: {args.model}: {problem}", file=sys.stderr)
                return 1
        if args.max_kv_size == "auto":
            from ..device_memory import auto_kv_limit

            args.max_kv_size = auto_kv_limit(model)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return _session(args, model, tokenizer, tools, ranks)
    finally:
        if ranks is not None:
            ranks.broadcast({"stop": True})


def _follow(args, ranks, model, tokenizer) -> int:
    """A rank other than 0: run each turn rank 0 sends, until it leaves."""
    from types import SimpleNamespace

    from ..server.distributed import follow

    # rank 0 fits each turn to --max-kv-size before sending it
    settings = SimpleNamespace(prefill_step=args.prefill_step, kv_cache_limit=None,
                               _prompt_cache=lambda partition: None)
    return follow(settings, ranks, model, tokenizer)


def _session(args, model, tokenizer, tools, ranks) -> int:
    session = ChatSession(model, tokenizer, args, tools=tools, ranks=ranks)
    save_history = _setup_readline(args.history_file) if sys.stdin.isatty() else None
    # A line that is not UTF-8 reaches the session (which refuses it, or takes it as a file
    # name) instead of ending it, and file names echo back as they were typed.
    for stream in (sys.stdin, sys.stdout):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    session.say(f"mlx-dsv4 chat: {args.model} | thinking mode {session.mode} | /help for commands")
    try:
        while True:
            try:
                line = input(">>> ")
            except KeyboardInterrupt:
                session.say("^C (Ctrl-D or /quit leaves)")
                continue
            except EOFError:
                session.say()
                break
            if not line.strip():
                continue
            if line.startswith("/"):
                if not session.command(line):
                    break
                continue
            session.turn(line)
    finally:
        if save_history:
            save_history()
    return 0
