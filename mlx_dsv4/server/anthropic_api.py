"""Anthropic Messages: request translation to V4 chat messages, responses, SSE events."""

import json

from ..chat import ContentDelta, ReasoningDelta, ToolCallComplete, ToolCallStarted
from .common import (
    Plan,
    dumps,
    forced_tool_prefix,
    format_constraint,
    get,
    new_id,
    parse_sampling,
    render_chat_prompt,
    tool_constraint,
    tools_for_choice,
    validate_functions,
    speculative_usage,
)
from .errors import APIError, anthropic_body


def _text_of(content, param, *, allow=("text",)):
    """Text blocks (or a string) joined as the chat encoder joins text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"'{param}' must be a string or a list of content blocks", param=param)
    texts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") not in allow:
            kind = block.get("type") if isinstance(block, dict) else None
            raise APIError(400, f"'{param}[{i}]': block type {kind!r} is not supported here", param=f"{param}[{i}]")
        if not isinstance(block.get("text"), str):
            raise APIError(400, f"'{param}[{i}].text' must be a string", param=f"{param}[{i}].text")
        texts.append(block["text"])
    return "\n\n".join(texts)


def _blocks(content, param):
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise APIError(400, f"'{param}' must be a string or a list of content blocks", param=param)
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise APIError(400, f"'{param}[{i}]' must be a content block object", param=f"{param}[{i}]")
    return content


def _user_messages(content, param):
    out, texts = [], []
    for i, block in enumerate(_blocks(content, param)):
        where = f"{param}[{i}]"
        kind = block["type"]
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise APIError(400, f"'{where}.text' must be a string", param=f"{where}.text")
            texts.append(block["text"])
        elif kind == "tool_result":
            tool_use_id = block.get("tool_use_id")
            if not isinstance(tool_use_id, str):
                raise APIError(400, f"'{where}.tool_use_id' must be a string", param=f"{where}.tool_use_id")
            result = block.get("content", "")
            text = _text_of(result, f"{where}.content") if result is not None else ""
            if block.get("is_error"):
                text = "Error: " + text
            out.append({"role": "tool", "tool_call_id": tool_use_id, "content": text})
        else:
            raise APIError(400, f"'{where}': content block type {kind!r} is not supported", param=where)
    if texts or not out:
        out.append({"role": "user", "content": "\n\n".join(texts)})
    return out


def _assistant_message(content, param):
    texts, reasoning, calls = [], [], []
    for i, block in enumerate(_blocks(content, param)):
        where = f"{param}[{i}]"
        kind = block["type"]
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise APIError(400, f"'{where}.text' must be a string", param=f"{where}.text")
            texts.append(block["text"])
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise APIError(400, f"'{where}.thinking' must be a string", param=f"{where}.thinking")
            reasoning.append(block["thinking"])
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise APIError(400, f"'{where}' needs a string 'id' and 'name'", param=where)
            if not isinstance(block.get("input"), dict):
                raise APIError(400, f"'{where}.input' must be an object", param=f"{where}.input")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}})
        else:
            raise APIError(400, f"'{where}': content block type {kind!r} is not supported", param=where)
    message = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(body):
    tools = get(body, "tools", list, default=[])
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise APIError(400, f"'tools[{i}]' must be an object", param=f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            raise APIError(400, f"'tools[{i}]': tool type {tool.get('type')!r} is not supported", param=f"tools[{i}].type")
        if not isinstance(tool.get("input_schema"), dict):
            raise APIError(400, f"'tools[{i}].input_schema' must be an object", param=f"tools[{i}].input_schema")
        function = {"name": tool.get("name")}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        function["parameters"] = tool["input_schema"]
        functions.append(function)
    names = validate_functions(functions, "tools")
    return [{"type": "function", "function": f} for f in functions], names


def _tool_choice(body, names):
    choice = get(body, "tool_choice", dict)
    if choice is None:
        return "auto", None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind, None
    if kind == "any":
        if not names:
            raise APIError(400, "'tool_choice' is 'any' but no tools were given", param="tool_choice")
        return "required", None
    if kind == "tool":
        if not isinstance(choice.get("name"), str) or choice["name"] not in names:
            raise APIError(400, f"'tool_choice.name' {choice.get('name')!r} is not among the tools", param="tool_choice.name")
        return "named", choice["name"]
    raise APIError(400, "'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'", param="tool_choice.type")


THINKING_TYPES = ("enabled", "adaptive", "between_tools", "disabled")
# Anthropic's effort levels onto the release's reasoning efforts, as the OpenAI side maps its own.
EFFORTS = {"low": "low", "medium": "high", "high": "high", "max": "max"}


def _thinking(body):
    """(thinking_mode, keep_reasoning): "between_tools" keeps the reasoning of every earlier
    assistant turn in the prompt (interleaved thinking), as the release does when tools are given."""
    thinking = get(body, "thinking", dict)
    if thinking is None:
        return "chat", False
    kind = thinking.get("type")
    if kind == "disabled":
        return "chat", False
    if kind in THINKING_TYPES:
        budget = thinking.get("budget_tokens")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise APIError(400, "'thinking.budget_tokens' must be a positive integer", param="thinking.budget_tokens")
        return "thinking", kind == "between_tools"
    raise APIError(400, f"'thinking.type' must be one of {', '.join(repr(t) for t in THINKING_TYPES)}",
                   param="thinking.type")


def _output_config(body):
    """(response_format, reasoning_effort) from ``output_config``; unknown keys are refused, not dropped."""
    config = get(body, "output_config", dict)
    if config is None:
        return None, None
    unknown = sorted(set(config) - {"format", "effort"})
    if unknown:
        raise APIError(400, f"'output_config.{unknown[0]}' is not supported (supported: format, effort)",
                       param=f"output_config.{unknown[0]}")
    effort = config.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise APIError(400, f"'output_config.effort' must be one of {', '.join(EFFORTS)}",
                       param="output_config.effort")
    response_format = None
    spec = config.get("format")
    if spec is not None:
        if not isinstance(spec, dict) or spec.get("type") != "json_schema" or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}",
                           param="output_config.format")
        response_format = spec["schema"]
    return response_format, EFFORTS.get(effort)


def parse_messages_request(body, ctx, *, count_only=False):
    model = get(body, "model", str, required=True)
    ctx.check_model(model)
    if not count_only:
        get(body, "max_tokens", int, required=True, check=lambda v: v >= 1, what="a positive integer")
    raw = get(body, "messages", list, required=True)
    if not raw:
        raise APIError(400, "'messages' must not be empty", param="messages")
    messages = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _text_of(system, "system")})
    prefill = None
    for i, message in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise APIError(400, f"'{param}.role' must be 'user' or 'assistant'", param=f"{param}.role")
        if "content" not in message:
            raise APIError(400, f"'{param}.content' is required", param=f"{param}.content")
        if message["role"] == "user":
            messages.extend(_user_messages(message["content"], f"{param}.content"))
        else:
            converted = _assistant_message(message["content"], f"{param}.content")
            if i == len(raw) - 1:
                if converted.get("tool_calls") or converted.get("reasoning_content"):
                    raise APIError(400, "a final assistant message may only hold text to continue from", param=param)
                prefill = converted["content"]
            else:
                messages.append(converted)
    thinking_mode, keep_reasoning = _thinking(body)
    response_format, effort = _output_config(body)
    if prefill and thinking_mode == "thinking":
        raise APIError(400, "a final assistant message (prefill) cannot be used with thinking", param="messages")
    sampling = parse_sampling(body, ctx.defaults, max_tokens_names=("max_tokens",), temperature_max=1.0,
                              stop_name="stop_sequences")
    tools, names = _tools(body)
    choice, named = _tool_choice(body, names)
    tools, names = tools_for_choice(tools, names, choice, named)
    prompt = render_chat_prompt(messages, ctx, tools=tools, thinking_mode=thinking_mode,
                                reasoning_effort=effort if thinking_mode == "thinking" else None,
                                response_format=response_format, keep_reasoning=keep_reasoning, param="messages")
    prefix = ""
    forced = choice in ("required", "named")
    if forced and thinking_mode == "chat":
        prefix = (prefill or "") + forced_tool_prefix(named)
    elif prefill:
        prefix = prefill
    constraint = None
    if forced:
        constraint = tool_constraint(tools, choice, thinking_mode=thinking_mode, prefix=prefix, lead=prefill or "")
    elif response_format is not None:
        # Anthropic's structured outputs are always strict; a prefill must begin the JSON.
        constraint = format_constraint(response_format, strict=True, thinking_mode=thinking_mode, prefix=prefill or "",
                                       param="output_config.format.schema")
    plan = Plan(prompt=prompt + prefix, sampling=sampling, stream=get(body, "stream", bool, default=False),
                model=model, thinking_mode=thinking_mode, prefix=prefix, echo_prefix=False,
                tool_names=tuple(sorted(names)), constraint=constraint)
    return plan


def usage(steps, *, output=True):
    last = steps.last
    prompt = last.prompt_tokens if last else 0
    cached = (getattr(last, "cached_tokens", 0) or 0) if last else 0
    body = {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}
    if output:
        body["output_tokens"] = last.generation_tokens if last else 0
        body.update(speculative_usage(steps))
    return body


def stop_reason(assembler, steps):
    if assembler.calls:
        return "tool_use", None
    if steps.finish_reason == "length":
        return "max_tokens", None
    if steps.stop_sequence:
        return "stop_sequence", steps.stop_sequence
    return "end_turn", None


def content_blocks(assembler):
    blocks = []
    if assembler.thinking_mode == "thinking":
        blocks.append({"type": "thinking", "thinking": assembler.reasoning_text or "", "signature": ""})
    if assembler.content_text or not assembler.calls:
        blocks.append({"type": "text", "text": assembler.content_text})
    for cid, name, arguments in assembler.calls:
        blocks.append({"type": "tool_use", "id": cid, "name": name, "input": json.loads(arguments)})
    return blocks


def message_response(plan, assembler, steps, message_id):
    reason, sequence = stop_reason(assembler, steps)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": content_blocks(assembler),
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(steps),
    }


def _event(name, data):
    return f"event: {name}\ndata: {dumps(data)}\n\n"


class MessageEvents:
    """Turns parser events into Anthropic streaming events, one content block at a time."""

    def __init__(self, plan, message_id):
        self.plan = plan
        self.id = message_id
        self.index = -1
        self.open = None  # kind of the open block
        self.open_call = None  # parser index of the call in an open tool_use block

    def start(self, prompt_tokens, cached_tokens=0):
        """The opening events; the usage splits the prompt as ``usage`` does at the end."""
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.plan.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": prompt_tokens - cached_tokens, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": cached_tokens, "output_tokens": 0}}
        return [_event("message_start", {"type": "message_start", "message": message}), _event("ping", {"type": "ping"})]

    def _close(self):
        out = []
        if self.open == "thinking":
            out.append(_event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                      "delta": {"type": "signature_delta", "signature": ""}}))
        if self.open is not None:
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.open = None
        return out

    def _open(self, kind, block):
        out = self._close()
        self.index += 1
        self.open = kind
        out.append(_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block}))
        return out

    def _delta(self, delta):
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def events(self, events, assembler):
        out = []
        for event in events:
            if isinstance(event, ReasoningDelta):
                if self.open != "thinking":
                    out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
            elif isinstance(event, ContentDelta):
                if self.open != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": event.text}))
            elif isinstance(event, ToolCallStarted):
                # Blocks cannot interleave: only the first call of a block opens early; the
                # parser completes all calls together at the end of the block.
                if self.open != "tool_use":
                    out += self._open("tool_use", {"type": "tool_use", "id": assembler.call_id(event.index),
                                                   "name": event.name, "input": {}})
                    self.open_call = event.index
            elif isinstance(event, ToolCallComplete):
                if self.open != "tool_use" or self.open_call != event.index:
                    out += self._open("tool_use", {"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
                out.append(self._delta({"type": "input_json_delta", "partial_json": event.arguments}))
                out += self._close()
        return out

    def end(self, assembler, steps):
        out = self._close()
        if self.index < 0:
            out += self._open("text", {"type": "text", "text": ""}) + self._close()
        reason, sequence = stop_reason(assembler, steps)
        out.append(_event("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                            "usage": usage(steps)}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return out

    @staticmethod
    def error(err):
        return [_event("error", anthropic_body(err))]


def new_message_id():
    return new_id("msg_")
