"""Tools: OpenAI function schemas from typed Python functions or JSON-schema dicts,
and validation of the model's arguments against them."""

import enum
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jsonschema


class ToolArgumentError(ValueError):
    """The model's arguments do not satisfy the tool's schema."""


_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def type_schema(annotation):
    """JSON schema of a Python type annotation."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"enum": [member.value for member in annotation]}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, getattr(types, "UnionType", ())):
        options = [a for a in args if a is not type(None)]
        schema = type_schema(options[0]) if len(options) == 1 else {"anyOf": [type_schema(a) for a in options]}
        if len(options) < len(args):
            schema = {"anyOf": [schema, {"type": "null"}]} if "type" not in schema else {
                **schema, "type": [schema["type"], "null"]}
        return schema
    if annotation in (list, tuple, set) or origin in (list, tuple, set):
        schema = {"type": "array"}
        if args:
            schema["items"] = type_schema(args[0])
        return schema
    if annotation is dict or origin is dict:
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = type_schema(args[1])
        return schema
    raise TypeError(f"no JSON schema for the type {annotation!r}")


def _docstring_parts(function):
    """(summary, {parameter: description}) from a Google- or Sphinx-style docstring."""
    doc = inspect.getdoc(function) or ""
    summary_lines, described = [], {}
    section = None
    current = None
    item_indent = None
    for line in doc.splitlines():
        stripped = line.strip()
        sphinx = re.match(r":param\s+(?:\w+\s+)?(\w+):\s*(.*)", stripped)
        if sphinx:
            current = sphinx.group(1)
            described[current] = sphinx.group(2)
            section = "sphinx"
            continue
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            section = "args"
            continue
        if stripped in ("Returns:", "Raises:", "Yields:", "Example:", "Examples:"):
            section = "other"
            continue
        if section is None:
            if not stripped and summary_lines:
                section = "body"
            elif stripped:
                summary_lines.append(stripped)
        elif section == "args" and stripped:
            indent = len(line) - len(line.lstrip())
            item = re.match(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if item and (item_indent is None or indent <= item_indent):
                item_indent = indent
                current = item.group(1)
                described[current] = item.group(2)
            elif current:
                described[current] += " " + stripped
    return " ".join(summary_lines), described


def schema_from_function(function, *, name=None, description=None):
    """OpenAI function tool (``{"type": "function", "function": {...}}``) for ``function``."""
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    summary, described = _docstring_parts(function)
    properties, required = {}, []
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"{function.__name__}: *args and **kwargs cannot be described to the model")
        schema = type_schema(hints.get(parameter.name, parameter.annotation))
        if parameter.name in described:
            schema["description"] = described[parameter.name]
        if parameter.default is inspect.Parameter.empty:
            required.append(parameter.name)
        else:
            try:
                json.dumps(parameter.default)
                schema["default"] = parameter.default
            except (TypeError, ValueError):
                pass
        properties[parameter.name] = schema
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {
        "type": "function",
        "function": {
            "name": name or function.__name__,
            "description": description if description is not None else summary,
            "parameters": parameters,
        },
    }


@dataclass
class Tool:
    """A tool the model can call.

    Exactly one of ``function`` (called with the arguments as keywords) and
    ``command`` (maps the arguments to an argv list run by the substrate) is set.
    ``substrate`` (a name, a risk level "trusted" or "untrusted", or an instance)
    overrides the agent's default for this tool. ``network``: the tool needs the network
    (the VM substrates give it a network device only then).
    """

    name: str
    description: str
    parameters: dict
    function: Optional[Callable] = None
    command: Optional[Callable[[dict], list]] = None
    substrate: object = None
    network: bool = False

    def __post_init__(self):
        if (self.function is None) == (self.command is None):
            raise ValueError(f"tool {self.name!r} needs exactly one of function and command")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", self.name):
            raise ValueError(f"tool name {self.name!r} must be letters, digits, '_', '.', '-' (at most 64)")
        jsonschema.Draft202012Validator.check_schema(self.parameters)
        self._validator = jsonschema.Draft202012Validator(self.parameters)

    @classmethod
    def from_function(cls, function, *, name=None, description=None, substrate=None, network=False):
        spec = schema_from_function(function, name=name, description=description)["function"]
        return cls(spec["name"], spec["description"], spec["parameters"], function=function, substrate=substrate,
                   network=network)

    @classmethod
    def from_schema(cls, schema, *, function=None, command=None, substrate=None):
        """From an OpenAI function tool dict or its bare ``function`` object."""
        spec = schema.get("function", schema) if schema.get("type", "function") == "function" else None
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError("expected an OpenAI function tool: {'type': 'function', 'function': {'name', ...}}")
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        return cls(spec["name"], spec.get("description", ""), parameters, function=function, command=command,
                   substrate=substrate)

    def schema(self):
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def validate(self, arguments):
        """``arguments`` (JSON text or dict) as a dict, or raise ``ToolArgumentError``."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise ToolArgumentError(f"arguments are not valid JSON: {err}") from None
        if not isinstance(arguments, dict):
            raise ToolArgumentError("arguments must be a JSON object")
        problems = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
        if problems:
            lines = []
            for problem in problems:
                where = "/".join(str(p) for p in problem.absolute_path)
                lines.append(f"{where}: {problem.message}" if where else problem.message)
            raise ToolArgumentError(f"invalid arguments for {self.name}: " + "; ".join(lines))
        return arguments


def tool(function=None, *, name=None, description=None, substrate=None, isolation=None, network=False):
    """Decorator (bare or with options) making a ``Tool`` of a typed function.
    ``isolation`` is another name for ``substrate`` (e.g. "microvm", or "untrusted")."""
    if substrate is not None and isolation is not None and substrate != isolation:
        raise ValueError(f"substrate={substrate!r} and isolation={isolation!r} disagree; give one")
    chosen = substrate if substrate is not None else isolation

    def make(f):
        return Tool.from_function(f, name=name, description=description, substrate=chosen, network=network)

    return make(function) if function is not None else make


def as_tool(item):
    """A ``Tool`` from a Tool, a typed function, or a (schema dict, function) pair."""
    if isinstance(item, Tool):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], dict):
        return Tool.from_schema(item[0], function=item[1])
    if callable(item):
        return Tool.from_function(item)
    raise TypeError(f"cannot make a tool of {item!r}")


def shell_tool(name="shell", description=None, *, shell="/bin/sh", substrate=None):
    """A tool that runs one shell command line (``sh -c COMMAND``) in its substrate."""
    return Tool(
        name,
        description or "Run a shell command line and return its output (stdout, then stderr) and exit status.",
        {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "the shell command line to run"}},
            "required": ["command"],
            "additionalProperties": False,
        },
        command=lambda arguments: [shell, "-c", arguments["command"]],
        substrate=substrate,
    )
