"""OpenAI Chat Completions and Completions: request validation, responses, SSE chunks."""

from ..chat import ContentDelta, ReasoningDelta, ToolCallComplete, ToolCallStarted
from .common import (
    Plan,
    dumps,
    finish_reason,
    forced_tool_prefix,
    get,
    new_id,
    now,
    parse_sampling,
    raw_prompt,
    format_constraint,
    render_chat_prompt,
    tool_constraint,
    tools_for_choice,
    validate_functions,
    speculative_usage,
)
from .errors import APIError

EFFORTS = {"none": None, "minimal": "low", "low": "low", "medium": "high", "high": "high", "max": "max", "xhigh": "max"}


def _thinking(body):
    """(thinking_mode, reasoning_effort) from reasoning_effort / thinking / chat_template_kwargs."""
    effort = get(body, "reasoning_effort", str, check=lambda v: v in EFFORTS,
                 what=f"one of {', '.join(EFFORTS)}")
    enabled = None
    thinking = body.get("thinking")
    if thinking is not None:
        if isinstance(thinking, bool):
            enabled = thinking
        elif isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
            enabled = thinking["type"] == "enabled"
        else:
            raise APIError(400, "'thinking' must be a boolean or {\"type\": \"enabled\" | \"disabled\"}", param="thinking")
    kwargs = get(body, "chat_template_kwargs", dict, default={})
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise APIError(400, f"'chat_template_kwargs.{key}' must be a boolean", param=f"chat_template_kwargs.{key}")
            enabled = kwargs[key] if enabled is None else enabled
    if enabled is False or (effort == "none" and not enabled):
        return "chat", None
    if enabled or effort is not None:
        return "thinking", EFFORTS.get(effort)
    return "chat", None


def _response_format(body):
    value = get(body, "response_format", dict)
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "'response_format.json_schema' must be an object with a 'schema' object",
                           param="response_format.json_schema")
        return spec.get("schema", {})
    raise APIError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                   param="response_format.type")


def _format_schema(body):
    """(schema, strict) that the reply must follow, or None; read after ``_response_format``
    has checked the field. Non-strict schemas are enforced as far as llguidance supports
    their keywords (the others are ignored); strict ones must be enforceable entirely."""
    value = body.get("response_format")
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"type": "object"}, True
    if kind == "json_schema":
        spec = value["json_schema"]
        strict = spec.get("strict", False)
        if not isinstance(strict, bool):
            raise APIError(400, "'response_format.json_schema.strict' must be a boolean",
                           param="response_format.json_schema.strict")
        return spec.get("schema", {}), strict
    return None


def _tools(body):
    tools = get(body, "tools", list, default=[])
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise APIError(400, f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{...}}}}", param=f"tools[{i}]")
        functions.append(tool["function"])
    names = validate_functions(functions, "tools")
    return tools, names


def _tool_choice(body, names):
    choice = body.get("tool_choice")
    if choice is None:
        return "auto", None
    if choice in ("auto", "none", "required"):
        if choice == "required" and not names:
            raise APIError(400, "'tool_choice' is 'required' but no tools were given", param="tool_choice")
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or name not in names:
            raise APIError(400, f"'tool_choice' names {name!r}, which is not among the tools", param="tool_choice")
        return "named", name
    raise APIError(400, "'tool_choice' must be 'auto', 'none', 'required' or a named function", param="tool_choice")


def _common(body, ctx):
    model = get(body, "model", str, required=True)
    ctx.check_model(model)
    n = get(body, "n", int, default=1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if get(body, "logprobs", (bool, int), default=False):
        raise APIError(400, "logprobs are not supported", param="logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        get(body, name, (int, float), check=lambda v: -2 <= v <= 2, what="a number between -2 and 2")
    stream = get(body, "stream", bool, default=False)
    options = get(body, "stream_options", dict, default={})
    include_usage = bool(options.get("include_usage")) if stream else True
    return model, stream, include_usage


def parse_chat_request(body, ctx):
    model, stream, include_usage = _common(body, ctx)
    messages = get(body, "messages", list, required=True)
    if not messages:
        raise APIError(400, "'messages' must not be empty", param="messages")
    sampling = parse_sampling(body, ctx.defaults, max_tokens_names=("max_tokens", "max_completion_tokens"))
    thinking_mode, effort = _thinking(body)
    tools, names = _tools(body)
    choice, named = _tool_choice(body, names)
    tools, names = tools_for_choice(tools, names, choice, named)
    prompt = render_chat_prompt(
        messages, ctx, tools=tools, thinking_mode=thinking_mode, reasoning_effort=effort,
        response_format=_response_format(body),
    )
    # In chat mode a required call opens with its tags written into the prompt; in thinking
    # mode the reasoning comes first. Either way the grammar then constrains the call.
    forced = choice in ("required", "named")
    prefix = forced_tool_prefix(named) if forced and thinking_mode == "chat" else ""
    if forced:
        constraint = tool_constraint(tools, choice, thinking_mode=thinking_mode, prefix=prefix)
    else:
        schema = _format_schema(body)
        constraint = None if schema is None else format_constraint(
            schema[0], strict=schema[1], thinking_mode=thinking_mode, param="response_format.json_schema.schema")
    return Plan(
        prompt=prompt + prefix, sampling=sampling, stream=stream, model=model, thinking_mode=thinking_mode,
        prefix=prefix, include_usage=include_usage, tool_names=tuple(sorted(names)), constraint=constraint,
    )


def parse_completion_request(body, ctx):
    model, stream, include_usage = _common(body, ctx)
    if get(body, "echo", bool, default=False):
        raise APIError(400, "echo is not supported", param="echo")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ids = None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < ctx.vocab_size for t in prompt):
            raise APIError(400, f"'prompt' token ids must lie in [0, {ctx.vocab_size})", param="prompt")
        ids = list(prompt)
    elif not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string, a list of one string, or a list of token ids",
                       param="prompt")
    suffix = get(body, "suffix", str)
    if suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    sampling = parse_sampling(body, ctx.defaults, max_tokens_names=("max_tokens",))
    if "max_tokens" not in body or body.get("max_tokens") is None:
        sampling.max_tokens = 16  # the Completions API default
    plan = Plan(prompt="" if ids else raw_prompt(prompt), sampling=sampling, stream=stream, model=model,
                parse=False, include_usage=include_usage)
    if ids:
        plan.prompt_ids = ids
    return plan


def usage(steps):
    last = steps.last
    prompt = last.prompt_tokens if last else 0
    completion = last.generation_tokens if last else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": getattr(last, "cached_tokens", 0) or 0},
        **speculative_usage(steps),
    }



def chat_message(assembler):
    message = {"role": "assistant", "content": assembler.content_text}
    if assembler.thinking_mode == "thinking":
        message["reasoning_content"] = assembler.reasoning_text
    if assembler.calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}
            for cid, name, arguments in assembler.calls
        ]
        if not message["content"]:
            message["content"] = None
    return message


def chat_response(plan, assembler, steps, response_id, created):
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "message": chat_message(assembler),
                "logprobs": None,
                "finish_reason": finish_reason(assembler, steps.finish_reason),
            }
        ],
        "usage": usage(steps),
    }


def completion_response(plan, assembler, steps, response_id, created):
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "text": assembler.content_text,
                "logprobs": None,
                "finish_reason": "length" if steps.finish_reason == "length" else "stop",
            }
        ],
        "usage": usage(steps),
    }


class ChatChunks:
    """Turns parser events into chat.completion.chunk SSE lines."""

    def __init__(self, plan, response_id, created, completion=False):
        self.plan = plan
        self.id = response_id
        self.created = created
        self.completion = completion
        self._tool_index = {}  # parser index -> OpenAI tool_calls index

    def _chunk(self, delta=None, finish=None, usage_block=None, choices=True):
        if self.completion:
            body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.plan.model,
                    "choices": [{"index": 0, "text": (delta or {}).get("content", ""), "logprobs": None,
                                 "finish_reason": finish}] if choices else []}
        else:
            body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.plan.model,
                    "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
                    if choices else []}
        if usage_block is not None:
            body["usage"] = usage_block
        return f"data: {dumps(body)}\n\n"

    def start(self):
        return [] if self.completion else [self._chunk({"role": "assistant", "content": ""})]

    def events(self, events, assembler):
        out = []
        for event in events:
            if isinstance(event, ContentDelta):
                out.append(self._chunk({"content": event.text}))
            elif isinstance(event, ReasoningDelta):
                out.append(self._chunk({"reasoning_content": event.text}))
            elif isinstance(event, ToolCallStarted):
                index = self._tool_index.setdefault(event.index, len(self._tool_index))
                call = {"index": index, "id": assembler.call_id(event.index), "type": "function",
                        "function": {"name": event.name, "arguments": ""}}
                out.append(self._chunk({"tool_calls": [call]}))
            elif isinstance(event, ToolCallComplete):
                index = self._tool_index.setdefault(event.index, len(self._tool_index))
                out.append(self._chunk({"tool_calls": [{"index": index, "function": {"arguments": event.arguments}}]}))
        return out

    def end(self, assembler, steps):
        if self.completion:
            reason = "length" if steps.finish_reason == "length" else "stop"
        else:
            reason = finish_reason(assembler, steps.finish_reason)
        out = [self._chunk({}, finish=reason)]
        if self.plan.include_usage:
            out.append(self._chunk(usage_block=usage(steps), choices=False))
        out.append("data: [DONE]\n\n")
        return out

    @staticmethod
    def error(err):
        from .errors import openai_body

        return [f"data: {dumps(openai_body(err))}\n\n", "data: [DONE]\n\n"]


def new_chat_id():
    return new_id("chatcmpl-"), now()


def new_completion_id():
    return new_id("cmpl-"), now()
