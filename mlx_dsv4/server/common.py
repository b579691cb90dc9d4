"""Pieces shared by the OpenAI and Anthropic front ends: field validation, sampling
parameters, the generation plan, and assembling a completion from DSML parser events."""

import json
import re
import secrets
import sys
import time
from dataclasses import dataclass, field

from ..chat import (
    ChatFormatError,
    ContentDelta,
    DSMLStreamParser,
    ReasoningDelta,
    ToolCallComplete,
    ToolCallStarted,
    caller_chars,
    encode_messages,
)
from ..chat.special import BOS, DSML, INVOKE_TAG, TOOL_CALLS_TAG
from ..sampling import SamplingParams
from .errors import APIError

_MISSING = object()
NUMBER = (int, float)
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def new_id(prefix):
    return prefix + secrets.token_hex(12)


def now():
    return int(time.time())


def type_name(types):
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}
    if types == NUMBER:
        return "a number"
    if isinstance(types, tuple):
        return " or ".join(names.get(t, t.__name__) for t in types)
    return names.get(types, types.__name__)


def get(body, name, types, *, default=None, required=False, check=None, what=None, param=None):
    """``body[name]`` checked against ``types`` (bool is never taken for a number)."""
    param = param or name
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise APIError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
        return default
    wanted = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in wanted) or not isinstance(value, wanted):
        raise APIError(400, f"'{param}' must be {what or type_name(types)}", param=param, code="invalid_type")
    if check is not None and not check(value):
        raise APIError(400, f"'{param}' must be {what}", param=param, code="invalid_value")
    return value


@dataclass
class Sampling(SamplingParams):
    max_tokens_given: bool = False  # the request set max_tokens (else it may be cut to fit the context)


def parse_stop(value, param):
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise APIError(400, f"'{param}' must be a non-empty string or a list of them", param=param)
    from ..generate import GenerationParameterError, check_stop_strings

    try:
        check_stop_strings(value)
    except GenerationParameterError as err:
        raise APIError(400, f"'{param}' {err.problem}", param=param, code="invalid_value")
    return tuple(value)


def parse_sampling(body, defaults, *, max_tokens_names, temperature_max=2.0, stop_name="stop"):
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = get(body, name, int, check=lambda v: v >= 1, what="a positive integer") or max_tokens
    temperature = get(body, "temperature", NUMBER, check=lambda v: 0 <= v <= temperature_max,
                      what=f"a number between 0 and {temperature_max:g}")
    top_p = get(body, "top_p", NUMBER, check=lambda v: 0 <= v <= 1, what="a number between 0 and 1")
    top_k = get(body, "top_k", int, check=lambda v: v >= 0, what="a non-negative integer")
    min_p = get(body, "min_p", NUMBER, check=lambda v: 0 <= v <= 1, what="a number between 0 and 1")
    repetition_penalty = get(body, "repetition_penalty", NUMBER, check=lambda v: 0 < v <= sys.float_info.max,
                             what="a positive number")
    seed = get(body, "seed", int)
    stop = parse_stop(body.get(stop_name), stop_name)
    sampling = Sampling(
        max_tokens=max_tokens or defaults.max_tokens,
        temperature=defaults.temperature if temperature is None else float(temperature),
        top_p=defaults.top_p if top_p is None else float(top_p),
        top_k=defaults.top_k if top_k is None else top_k,
        min_p=defaults.min_p if min_p is None else float(min_p),
        repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else float(repetition_penalty),
        seed=seed,
        stop=stop,
        max_tokens_given=max_tokens is not None,
    )
    if sampling.top_p == 0:
        sampling.temperature, sampling.top_p = 0.0, 1.0
    return sampling


@dataclass
class Plan:
    """What to generate: the prompt text, how to parse the output, and sampling."""

    prompt: str
    sampling: Sampling
    stream: bool
    model: str
    thinking_mode: str = "chat"
    prefix: str = ""  # assistant text forced at the end of the prompt; parsed as output
    echo_prefix: bool = True  # whether the prefix's own text is part of the reply
    parse: bool = True  # chat: parse DSML; raw completions: plain text
    include_usage: bool = False
    tool_names: tuple = ()
    prompt_ids: list = field(default_factory=list)
    constraint: object = None  # a constrain.Constraint on the output, compiled by compile_constraint
    matcher: object = None  # its llguidance matcher, fresh for this request


def speculative_usage(steps) -> dict:
    """With speculative decoding: {"speculative": {"proposed", "accepted"}}, the draft tokens of
    this generation and how many of them the model kept; {} when the server does not draft."""
    if getattr(steps, "drafter", None) is None:
        return {}
    last = steps.last
    return {"speculative": {"proposed": getattr(last, "draft_proposed", 0) if last else 0,
                            "accepted": getattr(last, "draft_accepted", 0) if last else 0}}


def validate_functions(functions, param):
    """Check OpenAI ``function`` objects (name, optional description and parameters schema)."""
    names = set()
    for i, function in enumerate(functions):
        where = f"{param}[{i}]"
        if not isinstance(function, dict):
            raise APIError(400, f"'{where}' must be an object", param=where)
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise APIError(400, f"'{where}.name' must be 1-128 characters of letters, digits, '_', '.', ':' or '-'",
                           param=f"{where}.name")
        if name in names:
            raise APIError(400, f"duplicate tool name {name!r}", param=f"{where}.name")
        names.add(name)
        if "description" in function and not isinstance(function["description"], (str, type(None))):
            raise APIError(400, f"'{where}.description' must be a string", param=f"{where}.description")
        schema = function.get("parameters")
        if schema is not None:
            if not isinstance(schema, dict):
                raise APIError(400, f"'{where}.parameters' must be a JSON schema object", param=f"{where}.parameters")
            kind = schema.get("type", "object")
            if kind != "object":
                raise APIError(400, f"'{where}.parameters' must describe an object (type 'object')",
                               param=f"{where}.parameters.type")
            props = schema.get("properties", {})
            if not isinstance(props, dict):
                raise APIError(400, f"'{where}.parameters.properties' must be an object",
                               param=f"{where}.parameters.properties")
    return names


def tools_for_choice(tools, names, choice, named):
    """The tools to render for a parsed tool_choice: none for "none", only the named one for a name."""
    if choice == "none":
        return [], set()
    if named is not None:
        return [t for t in tools if t["function"]["name"] == named], names
    return tools, names


def forced_tool_prefix(name=None):
    """Assistant text that commits the model to a tool call (chat mode), optionally of ``name``."""
    prefix = f"\n\n<{DSML}{TOOL_CALLS_TAG}>\n<{DSML}{INVOKE_TAG} name=\""
    return prefix + f'{name}">\n' if name else prefix


def format_constraint(schema, *, strict, thinking_mode, prefix="", param):
    """The output constraint for a JSON response format; ``prefix`` (a prefill) must begin the JSON."""
    from ..constrain import Constraint, json_grammar

    return Constraint(json_grammar(schema, strict=strict, thinking=thinking_mode == "thinking"), prefix=prefix,
                      where=param)


def tool_constraint(tools, choice, *, thinking_mode, prefix="", lead="", param="tools"):
    """The output constraint for a forced tool choice ("required": one or more calls of any of
    ``tools``; "named": one call of the only tool left). ``prefix`` is the output text already
    in the prompt (``lead`` + the forced opening tags, in chat mode)."""
    from ..constrain import Constraint, ConstraintError, tool_call_grammar

    functions = [t["function"] for t in tools]
    strict = all(f.get("strict") is True for f in functions)
    try:
        grammar = tool_call_grammar(functions, several=choice == "required", strict=strict,
                                    thinking=thinking_mode == "thinking", lead=lead)
    except ConstraintError as err:
        raise APIError(400, f"'{param}': tool {err.where!r} cannot be enforced: {err.problem}", param=param,
                       code="invalid_value")
    return Constraint(grammar, prefix=prefix, where=param)


def compile_constraint(plan, tokenizer):
    """Build the plan's matcher; a schema llguidance cannot enforce is a 400 naming its field."""
    if plan.constraint is None:
        return
    from ..constrain import ConstraintError

    try:
        plan.matcher = plan.constraint.matcher(tokenizer)
    except ConstraintError as err:
        where = plan.constraint.where
        raise APIError(400, f"'{where}' cannot be enforced: {err.problem}", param=where, code="invalid_value")


def render_chat_prompt(messages, ctx, *, tools, thinking_mode, reasoning_effort, response_format,
                       keep_reasoning=False, param="messages"):
    """encode_messages with response_format put on the system message; ChatFormatError -> 400.
    A prompt whose caller text alone is too long for ``ctx`` is refused before it is rendered."""
    ctx.check_prompt_chars(caller_chars(messages), param)
    shift = 0
    if response_format is not None:
        messages = list(messages)
        first = messages[0] if messages else None
        if isinstance(first, dict) and first.get("role") == "system" and "response_format" not in first:
            messages[0] = {**first, "response_format": response_format}
        else:
            messages.insert(0, {"role": "system", "content": "", "response_format": response_format})
            shift = 1
    try:
        return encode_messages(
            messages,
            thinking_mode=thinking_mode,
            reasoning_effort=reasoning_effort,
            tools=tools or None,
            keep_reasoning=keep_reasoning,
        )
    except ChatFormatError as err:
        where = param
        if err.index is not None and err.index - shift >= 0:
            where += f"[{err.index - shift}]"
        if err.field:
            where = f"{where}.{err.field}" if err.index is not None else err.field
        raise APIError(400, str(err), param=where, code="invalid_messages")


def raw_prompt(text):
    """Raw completions start with BOS like every V4 sequence unless the caller wrote it."""
    return text if text.startswith(BOS) else BOS + text


class Assembler:
    """Feeds generated text through the DSML parser; collects reasoning, content and calls."""

    def __init__(self, thinking_mode, *, prefix="", echo_prefix=True, id_prefix="call_", parse=True):
        self.parse = parse
        self._ids = {}
        self._id_prefix = id_prefix
        self.reasoning = []
        self.content = []
        self.calls = []  # (id, name, arguments JSON text)
        self.started = {}  # parser index -> (id, name)
        self.repairs = ()
        self.thinking_mode = thinking_mode
        self._parser = DSMLStreamParser(thinking_mode, strict=False, call_id_factory=self.call_id) if parse else None
        self._prefix_events = self._parser.feed(prefix) if parse and prefix else []
        if not echo_prefix:
            self._prefix_events = [e for e in self._prefix_events if not isinstance(e, (ContentDelta, ReasoningDelta))]

    def call_id(self, index):
        if index not in self._ids:
            self._ids[index] = new_id(self._id_prefix)
        return self._ids[index]

    def _record(self, events):
        for event in events:
            if isinstance(event, ReasoningDelta):
                self.reasoning.append(event.text)
            elif isinstance(event, ContentDelta):
                self.content.append(event.text)
            elif isinstance(event, ToolCallStarted):
                self.started[event.index] = (self.call_id(event.index), event.name)
            elif isinstance(event, ToolCallComplete):
                self.calls.append((event.id, event.name, event.arguments))
            elif hasattr(event, "repairs"):
                self.repairs = event.repairs
        return [e for e in events if not hasattr(e, "repairs")]

    def feed(self, text):
        if not self.parse:
            if text:
                self.content.append(text)
                return [ContentDelta(text)]
            return []
        events = self._prefix_events
        self._prefix_events = []
        if text:
            events = events + self._parser.feed(text)
        return self._record(events)

    def finish(self):
        if not self.parse:
            return []
        events = self._prefix_events + self._parser.finish()
        self._prefix_events = []
        return self._record(events)

    @property
    def reasoning_text(self):
        return "".join(self.reasoning) if self.thinking_mode == "thinking" else None

    @property
    def content_text(self):
        return "".join(self.content)


def finish_reason(assembler, engine_reason):
    if assembler.calls:
        return "tool_calls"
    if engine_reason == "length":
        return "length"
    return "stop"


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
