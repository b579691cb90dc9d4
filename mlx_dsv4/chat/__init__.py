"""V4 chat wire format: encoding messages to prompt text and parsing DSML completions.

Encoding: ``encode_messages(messages, *, thinking_mode, reasoning_effort, tools,
keep_reasoning, add_generation_prompt)`` -> prompt text, and
``encode_messages_to_ids(messages, tokenizer=None, **options)`` -> token ids.

Parsing: ``parse_completion(text, thinking_mode, strict=True)`` -> dict, and the
incremental ``DSMLStreamParser`` with its events ``ReasoningDelta``, ``ContentDelta``,
``ToolCallStarted``, ``ToolCallComplete`` and ``Done``.

Adapters between OpenAI function calling and DSML: ``tool_calls_to_dsml``,
``dsml_to_tool_calls``, ``render_tools_block``. All failures raise ``ChatFormatError``.
"""

from .adapters import dsml_to_tool_calls, render_tools_block, tool_calls_to_dsml
from .encode import caller_chars, encode_messages, encode_messages_to_ids
from .errors import ChatFormatError
from .parse import parse_completion
from .special import INITIAL_RELEASE_REASONING_EFFORT_PROMPTS, REASONING_EFFORT_PROMPTS
from .stream import (
    ContentDelta,
    Done,
    DSMLStreamParser,
    ReasoningDelta,
    ToolCallComplete,
    ToolCallStarted,
)

__all__ = [
    "ChatFormatError",
    "ContentDelta",
    "Done",
    "DSMLStreamParser",
    "INITIAL_RELEASE_REASONING_EFFORT_PROMPTS",
    "REASONING_EFFORT_PROMPTS",
    "ReasoningDelta",
    "ToolCallComplete",
    "ToolCallStarted",
    "caller_chars",
    "dsml_to_tool_calls",
    "encode_messages",
    "encode_messages_to_ids",
    "parse_completion",
    "render_tools_block",
    "tool_calls_to_dsml",
]
