"""Protocol strings of the V4 wire format, their token ids, and the fixed prompt texts.

Everything here must match the official encoder (``encoding/encoding_dsv4.py`` in the
Hub repositories) byte for byte; nothing else in the package spells these strings.
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DSML = "｜DSML｜"

TOKEN_IDS = {
    BOS: 0,
    EOS: 1,
    USER: 128803,
    ASSISTANT: 128804,
    THINK_OPEN: 128821,
    THINK_CLOSE: 128822,
    DSML: 128825,
    LATEST_REMINDER: 128828,
}

# Strings that become protocol tokens when tokenised; they may not appear in any text a
# caller supplies, or the prompt would change meaning.
RESERVED_STRINGS = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK_OPEN, THINK_CLOSE, DSML)

TOOL_CALLS_TAG = "tool_calls"
INVOKE_TAG = "invoke"
PARAMETER_TAG = "parameter"

TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"

RESPONSE_FORMAT_HEADER = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)

TOOLS_BLOCK_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{tool_schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

# Reasoning-effort paragraphs, prepended to the first rendered message in thinking mode.
#
# REASONING_EFFORT_PROMPTS follows the encoder shipped with DeepSeek-V4-Flash-0731
# (Hub revision 7872f01b1d1fe23eabc4c98b48bffcef5a386062), where "high" and "max" each
# have a paragraph. Verified by SHA-256 of the UTF-8 bytes against that revision:
#   high: 476 bytes, f7a24f3b3050d4a83781e9b755b316aae2ec1d9dc87562541d90bcb04d7350f7
#   max:  528 bytes, 53fb31b8392ec5b4a926481943efc67636748f137c1a49d493a7af4d4fa55d2c
_ABSOLUTE_MAXIMUM = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem "
    "to resolve the root cause, rigorously stress-testing your logic against all potential "
    "paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no "
    "assumption is left unchecked.\n\n"
)
_BEYOND_MAXIMUM = (
    "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: "
    "exhaustively decompose the problem into its most fundamental components, trace every "
    "causal chain to its root, and resolve the underlying cause rather than any surface "
    "symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple "
    "angles and are certain that no assumption remains unchecked and no error remains "
    "undiscovered.\n\n"
)
REASONING_EFFORT_PROMPTS = {"low": "", "high": _ABSOLUTE_MAXIMUM, "max": _BEYOND_MAXIMUM}

# The encoder of the first V4-Flash / V4-Pro release knew one paragraph only, sent for
# "max"; "high" rendered exactly like no effort. Pass this table as ``effort_prompts``
# to reproduce prompts of that encoder.
INITIAL_RELEASE_REASONING_EFFORT_PROMPTS = {"low": "", "high": "", "max": _ABSOLUTE_MAXIMUM}
