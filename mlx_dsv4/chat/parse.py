"""Whole-completion parsing, built on the streaming parser so both agree exactly."""

from .stream import ContentDelta, Done, DSMLStreamParser, ReasoningDelta, ToolCallComplete


def parse_completion(text, thinking_mode, strict=True, *, call_id_factory=None):
    """Parse one assistant completion (the text after the prompt, EOS optional).

    Returns ``{"reasoning_content", "content", "tool_calls", "repairs"}``:
    ``reasoning_content`` is None in chat mode; ``tool_calls`` are OpenAI tool calls
    (``{"id", "type": "function", "function": {"name", "arguments"}}``, arguments as
    JSON text; ``string="true"`` values verbatim, others parsed as JSON). ``repairs``
    lists what lenient mode (``strict=False``) fixed; strict mode raises
    ``ChatFormatError`` naming the byte offset instead.
    """
    parser = DSMLStreamParser(thinking_mode, strict=strict, call_id_factory=call_id_factory)
    events = parser.feed(text) + parser.finish()
    reasoning, content, calls, repairs = [], [], [], []
    for event in events:
        if isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ToolCallComplete):
            calls.append(
                {
                    "id": event.id,
                    "type": "function",
                    "function": {"name": event.name, "arguments": event.arguments},
                }
            )
        elif isinstance(event, Done):
            repairs = list(event.repairs)
    return {
        "reasoning_content": "".join(reasoning) if thinking_mode == "thinking" else None,
        "content": "".join(content),
        "tool_calls": calls,
        "repairs": repairs,
    }
