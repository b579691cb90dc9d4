"""OpenAI function-calling JSON <-> DSML.

``tool_calls_to_dsml`` renders OpenAI ``tool_calls`` (arguments as JSON text) as the
``<｜DSML｜tool_calls>`` block the model reads and writes; ``dsml_to_tool_calls`` turns
such a block back into OpenAI ``tool_calls``. ``render_tools_block`` renders OpenAI
function tools as the tools section of a system or developer message.
"""

from .errors import ChatFormatError
from .parse import parse_completion
from .special import DSML, INVOKE_TAG, PARAMETER_TAG, TOOL_CALLS_TAG, TOOLS_BLOCK_TEMPLATE
from .wiretext import check_reserved, literal, name_fault, strict_json_loads, to_json


def tool_functions(tools, *, index=None, field="tools"):
    """Validate OpenAI function tools and return their ``function`` objects."""
    if not isinstance(tools, list):
        raise ChatFormatError("must be a list of function tools", index=index, field=field)
    functions = []
    for i, tool in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ChatFormatError("must be an object with type 'function'", index=index, field=where)
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatFormatError(
                "must carry a 'function' object with a string 'name'", index=index, field=where
            )
        try:
            literal(to_json(function), index=index, field=where)  # serialisable, and can be marked
        except (TypeError, ValueError) as err:
            raise ChatFormatError(f"is not JSON serialisable: {err}", index=index, field=where)
        functions.append(function)
    return functions


def render_tools_block(tools, *, index=None, field="tools", marked=False):
    """The tools section for OpenAI function ``tools``, ending with a newline.

    ``marked``: the schemas are marked as caller text (for the prompt encoder)."""
    mark = literal if marked else str
    schemas = "\n".join(mark(to_json(f)) for f in tool_functions(tools, index=index, field=field))
    return TOOLS_BLOCK_TEMPLATE.replace("{tool_schemas}", schemas)


def arguments_object(arguments, *, index=None, field="arguments"):
    """The arguments of one call as a dict: JSON text of an object, or a dict."""
    if isinstance(arguments, str):
        try:
            arguments = strict_json_loads(arguments)
        except (ValueError, RecursionError) as err:
            raise ChatFormatError(f"is not valid JSON: {err}", index=index, field=field)
    if not isinstance(arguments, dict):
        raise ChatFormatError("must be a JSON object", index=index, field=field)
    return arguments


def _check_attribute(value, *, index, field):
    bad = name_fault(value)
    if bad in ('"', "\n"):
        raise ChatFormatError("may not contain '\"' or a newline", index=index, field=field)
    if bad is not None:
        raise ChatFormatError(f"contains the reserved protocol string {bad!r}", index=index, field=field)


def render_invoke(name, arguments, *, index=None, field="tool_calls[0]", marked=False):
    """One ``<｜DSML｜invoke>`` element for a call of ``name`` with ``arguments`` (a dict).

    ``marked``: values are marked as caller text (for the prompt encoder); otherwise a value
    that spells a protocol string is refused, since plain text would tokenise it as one."""
    _check_attribute(name, index=index, field=f"{field}.function.name")
    lines = [f'<{DSML}{INVOKE_TAG} name="{name}">']
    for key, value in arguments.items():
        where = f"{field}.function.arguments.{key}"
        _check_attribute(key, index=index, field=where)
        if isinstance(value, str):
            text, is_string = value, "true"
        else:
            try:
                text, is_string = to_json(value), "false"
            except (TypeError, ValueError) as err:
                raise ChatFormatError(f"is not JSON serialisable: {err}", index=index, field=where)
        if marked:
            text = literal(text, index=index, field=where)
        else:
            check_reserved(text, index=index, field=where)
        lines.append(
            f'<{DSML}{PARAMETER_TAG} name="{key}" string="{is_string}">{text}</{DSML}{PARAMETER_TAG}>'
        )
    # With no parameters the official template still puts two newlines between the tags.
    body = "\n".join(lines[1:])
    return f"{lines[0]}\n{body}\n</{DSML}{INVOKE_TAG}>"


def openai_call_parts(call, *, index=None, field="tool_calls[0]"):
    """(name, arguments dict, id or None) of one OpenAI tool call."""
    if not isinstance(call, dict):
        raise ChatFormatError("must be an object", index=index, field=field)
    unknown = set(call) - {"id", "type", "function", "index"}
    if unknown:
        raise ChatFormatError(f"unknown field {sorted(unknown)[0]!r}", index=index, field=field)
    if call.get("type", "function") != "function":
        raise ChatFormatError("type must be 'function'", index=index, field=f"{field}.type")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise ChatFormatError("must be a string", index=index, field=f"{field}.id")
    function = call.get("function")
    if not isinstance(function, dict):
        raise ChatFormatError("must be an object", index=index, field=f"{field}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ChatFormatError("must be a non-empty string", index=index, field=f"{field}.function.name")
    if "arguments" not in function:
        raise ChatFormatError("is missing", index=index, field=f"{field}.function.arguments")
    arguments = arguments_object(
        function["arguments"], index=index, field=f"{field}.function.arguments"
    )
    return name, arguments, call_id


def tool_calls_to_dsml(tool_calls, *, index=None, field="tool_calls"):
    """Render OpenAI ``tool_calls`` as a ``<｜DSML｜tool_calls>`` block (no leading blank line)."""
    if not isinstance(tool_calls, list) or not tool_calls:
        raise ChatFormatError("must be a non-empty list", index=index, field=field)
    invokes = []
    for i, call in enumerate(tool_calls):
        where = f"{field}[{i}]"
        name, arguments, _ = openai_call_parts(call, index=index, field=where)
        invokes.append(render_invoke(name, arguments, index=index, field=where))
    return f"<{DSML}{TOOL_CALLS_TAG}>\n" + "\n".join(invokes) + f"\n</{DSML}{TOOL_CALLS_TAG}>"


def dsml_to_tool_calls(text, *, strict=True, call_id_factory=None):
    """Parse one ``<｜DSML｜tool_calls>`` block (surrounding whitespace allowed) into OpenAI ``tool_calls``.

    Raises ``ChatFormatError`` on anything but a single well-formed block (strict), or
    when lenient parsing cannot recover a complete block.
    """
    block = text.lstrip()
    skipped = len(text[: len(text) - len(block)].encode("utf-8"))
    # Parsed as a chat completion that is nothing but the block; that adds two bytes.
    try:
        result = parse_completion("\n\n" + block, "chat", strict=strict, call_id_factory=call_id_factory)
    except ChatFormatError as err:
        raise ChatFormatError(str(err).split(": ", 1)[1], offset=err.offset - 2 + skipped) from None
    if result["content"] or not block.startswith("<"):
        raise ChatFormatError("text before the tool_calls block", offset=skipped)
    if not strict and any("discarded" in r for r in result["repairs"]):
        raise ChatFormatError("; ".join(result["repairs"]), offset=skipped)
    return result["tool_calls"]
