"""The agent loop: generate, parse DSML tool calls while streaming, validate, execute
in the tool's substrate, append the results, repeat until a final answer."""

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..chat import (
    ContentDelta,
    Done,
    DSMLStreamParser,
    ReasoningDelta,
    ToolCallComplete,
    encode_messages,
)
from ..chat.special import THINK_OPEN
from ..metrics import TOOL_CALLS
from .log import StepLog
from .substrates import ExecutionResult, make_substrate
from .tools import ToolArgumentError, as_tool


DEFAULT_PROMPT_STORE_BYTES = 1 << 30
AGENT_PARTITION = "local"


@dataclass
class ToolCallRecord:
    step: int
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it
    result: ExecutionResult


@dataclass
class AgentResult:
    content: Optional[str]  # the final answer; None when the run stopped at max_steps
    reasoning_content: Optional[str]
    stop_reason: str  # "final", "length" (the last generation hit max_tokens) or "max_steps"
    steps: int
    messages: list
    tool_calls: list = field(default_factory=list)


class Agent:
    """Runs a model with tools until it answers.

    ``tools``: ``Tool`` objects, typed functions, or (OpenAI schema dict, function)
    pairs. ``substrate`` (name or instance) runs every tool without one of its own;
    ``tool_substrates`` ({tool name: substrate}, as a runtime config's ``agent.tools``)
    overrides it per tool. ``prompt_store``: a ``PrefixStore`` to keep prompt caches in.
    ``completion_fn(prompt_text)`` replaces generation (tests script it): it yields
    text chunks or objects with ``.text`` (and optionally ``.prompt_tokens``,
    ``.generation_tokens``, ``.finish_reason``). By default ``stream_generate`` is used
    with a prompt cache, so each round prefills only the new tokens. ``on_event`` gets
    every parser event and each ``("tool_result", ToolCallRecord)``. ``draft`` (a name of
    ``mlx_dsv4.generate.DRAFTERS``, e.g. "mtp": the model loaded with ``mtp=True``) decodes
    with speculative decoding, ``num_draft`` tokens proposed per forward pass; the prompt
    cache keeps the drafter's state between rounds. A ``draft`` the model or the generation
    options cannot use raises ``GenerationParameterError`` here, naming it.

    Every step goes to ``log_path`` as JSON Lines: "generation" records (prompt_tokens,
    completion_tokens, reasoning, content, tool_calls, finish_reason, repairs,
    duration_s) and "tool" records (call_id, name, arguments, status, result,
    execution details, substrate, duration_s).
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        tools=(),
        *,
        substrate="function",
        max_steps=8,
        log_path=None,
        thinking_mode="chat",
        reasoning_effort=None,
        system=None,
        max_tokens=1024,
        temperature=0.0,
        completion_fn: Optional[Callable] = None,
        generation_options=None,
        max_result_chars=16000,
        on_event=None,
        prompt_store=None,
        tool_substrates=None,
        draft="none",
        num_draft=3,
    ):
        if thinking_mode not in ("chat", "thinking"):
            raise ValueError("thinking_mode must be 'chat' or 'thinking'")
        self.model = model
        self.tokenizer = tokenizer
        self.tools = {}
        for item in tools:
            t = as_tool(item)
            if t.name in self.tools:
                raise ValueError(f"two tools are named {t.name!r}")
            self.tools[t.name] = t
        for name, choice in (tool_substrates or {}).items():
            if name not in self.tools:
                raise ValueError(f"tool_substrates names {name!r}, which is not among the tools "
                                 f"({', '.join(sorted(self.tools)) or 'none'})")
            self.tools[name] = dataclasses.replace(self.tools[name], substrate=choice)
        self.default_substrate = substrate
        self._substrates = {}
        self.max_steps = max_steps
        self.log = StepLog(log_path)
        self.thinking_mode = thinking_mode
        self.reasoning_effort = reasoning_effort
        self.system = system
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.completion_fn = completion_fn
        self.generation_options = dict(generation_options or {})
        self.max_result_chars = max_result_chars
        self.on_event = on_event
        self.prompt_store = prompt_store  # a PrefixStore (e.g. one with a folder, shared with chat)
        self._prompt_cache = None
        if completion_fn is None and model is None:
            raise ValueError("give a model and tokenizer, or a completion_fn")
        from ..generate import check_draft

        check_draft(model, draft, num_draft, temperature=temperature,
                    sampler=self.generation_options.get("sampler"),
                    logits_processors=self.generation_options.get("logits_processors"),
                    repetition_penalty=self.generation_options.get("repetition_penalty"))
        self.draft, self.num_draft = draft, num_draft
        # Resolve substrates now: a missing sandbox tool is an error before the first call.
        for t in self.tools.values():
            self.substrate_for(t)

    # -- pieces ----------------------------------------------------------------

    def substrate_for(self, t):
        choice = t.substrate if t.substrate is not None else self.default_substrate
        key = choice if isinstance(choice, str) else id(choice)
        if key not in self._substrates:
            self._substrates[key] = make_substrate(choice)
        return self._substrates[key]

    def tool_schemas(self):
        return [t.schema() for t in self.tools.values()]

    def _generate(self, prompt):
        from ..generate import stream_generate

        if self._prompt_cache is None:
            from ..prefix_store import PrefixStore

            store = self.prompt_store or PrefixStore(self.model, memory_bytes=DEFAULT_PROMPT_STORE_BYTES)
            self._prompt_cache = store.view(AGENT_PARTITION)
        yield from stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            prompt_cache=self._prompt_cache,
            **({"draft": self.draft, "num_draft": self.num_draft} if self.draft != "none" else {}),
            **self.generation_options,
        )

    def _counting_tokenizer(self):
        if self.tokenizer is None:
            from ..tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(None)
        return self.tokenizer

    def _emit(self, event):
        if self.on_event is not None:
            self.on_event(event)

    def _complete(self, step, prompt):
        """One generation, parsed while it streams."""
        parser = DSMLStreamParser("thinking" if prompt.endswith(THINK_OPEN) else "chat", strict=False)
        reasoning, content, calls = [], [], []
        prompt_tokens = completion_tokens = None
        finish_reason, repairs, text = None, [], []
        start = time.perf_counter()
        chunks = self.completion_fn(prompt) if self.completion_fn is not None else self._generate(prompt)

        def take(events):
            nonlocal repairs
            for event in events:
                self._emit(event)
                if isinstance(event, ReasoningDelta):
                    reasoning.append(event.text)
                elif isinstance(event, ContentDelta):
                    content.append(event.text)
                elif isinstance(event, ToolCallComplete):
                    calls.append({"id": event.id, "type": "function",
                                  "function": {"name": event.name, "arguments": event.arguments}})
                elif isinstance(event, Done):
                    repairs = list(event.repairs)

        count = 0
        for chunk in chunks:
            piece = chunk if isinstance(chunk, str) else getattr(chunk, "text", "")
            count += 1
            prompt_tokens = getattr(chunk, "prompt_tokens", prompt_tokens)
            completion_tokens = getattr(chunk, "generation_tokens", completion_tokens)
            finish_reason = getattr(chunk, "finish_reason", None) or finish_reason
            text.append(piece)
            before = len(calls)
            take(parser.feed(piece))
            if len(calls) > before:
                # After the tool-call block the model can only end its turn.
                finish_reason = finish_reason or "tool_calls"
                break
        take(parser.finish())
        if hasattr(chunks, "close"):
            chunks.close()
        if prompt_tokens is None:
            prompt_tokens = len(self._counting_tokenizer().encode(prompt))
        if completion_tokens is None:
            completion_tokens = count
        duration = time.perf_counter() - start
        message = {"role": "assistant", "content": "".join(content)}
        if self.thinking_mode == "thinking":
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        self.log.write(
            "generation", step,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            reasoning=message.get("reasoning_content"), content=message["content"],
            tool_calls=[{"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                        for c in calls],
            finish_reason=finish_reason or "stop", repairs=repairs, text="".join(text),
            duration_s=round(duration, 6),
        )
        return message, finish_reason

    def execute(self, step, call):
        """Validate and run one call; every failure becomes the tool's result."""
        name = call["function"]["name"]
        arguments = call["function"]["arguments"]
        start = time.perf_counter()
        t = self.tools.get(name)
        substrate_name = None
        if t is None:
            known = ", ".join(sorted(self.tools)) or "none"
            result = ExecutionResult("invalid", error=f"unknown tool {name!r}; the tools are: {known}")
        else:
            substrate = self.substrate_for(t)
            substrate_name = substrate.name
            try:
                parsed = t.validate(arguments)
            except ToolArgumentError as err:
                result = ExecutionResult("invalid", error=str(err))
            else:
                result = substrate.run(t, parsed)
        result.duration_s = result.duration_s or (time.perf_counter() - start)
        TOOL_CALLS.observe(substrate_name, result.duration_s)
        # Tool output goes into the prompt as caller text: protocol strings in it stay ordinary text.
        content = result.to_content(self.max_result_chars)
        record = ToolCallRecord(step, call["id"], name, arguments, result)
        self.log.write(
            "tool", step,
            call_id=call["id"], name=name, arguments=arguments, status=result.status, result=content,
            execution=result.to_dict(), substrate=substrate_name,
            duration_s=round(time.perf_counter() - start, 6),
        )
        self._emit(("tool_result", record))
        return record, {"role": "tool", "tool_call_id": call["id"], "content": content}

    # -- the loop --------------------------------------------------------------

    def run(self, task):
        """Run until a final answer or ``max_steps`` generations. ``task``: the user's
        message (text) or a whole message list to continue."""
        if isinstance(task, str):
            messages = ([{"role": "system", "content": self.system}] if self.system else [])
            messages.append({"role": "user", "content": task})
        else:
            messages = [dict(m) for m in task]
        start = time.perf_counter()
        self.log.write("run_start", 0, task=task if isinstance(task, str) else None,
                       tools=sorted(self.tools), thinking_mode=self.thinking_mode,
                       substrates={n: self.substrate_for(t).name for n, t in self.tools.items()})
        records = []
        message, stop_reason, step = None, "max_steps", 0
        for step in range(1, self.max_steps + 1):
            prompt = encode_messages(
                messages, thinking_mode=self.thinking_mode, reasoning_effort=self.reasoning_effort,
                tools=self.tool_schemas() or None,
            )
            message, finish_reason = self._complete(step, prompt)
            messages.append(message)
            if not message.get("tool_calls"):
                stop_reason = "length" if finish_reason == "length" else "final"
                break
            for call in message["tool_calls"]:
                record, tool_message = self.execute(step, call)
                records.append(record)
                messages.append(tool_message)
        final = message if stop_reason != "max_steps" else None
        self.log.write("run_end", step, stop_reason=stop_reason, steps=step,
                       content=final["content"] if final else None,
                       duration_s=round(time.perf_counter() - start, 6))
        return AgentResult(
            content=final["content"] if final else None,
            reasoning_content=final.get("reasoning_content") if final else None,
            stop_reason=stop_reason, steps=step, messages=messages, tool_calls=records,
        )

    def close(self):
        for substrate in self._substrates.values():
            substrate.close()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
