"""Tool schemas from typed functions and JSON-schema dicts, and argument validation."""

import enum
from typing import Literal, Optional

import pytest

from mlx_dsv4.agent import Tool, ToolArgumentError, as_tool, schema_from_function, shell_tool, tool
from mlx_dsv4.chat import encode_messages


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


def forecast(city: str, days: int, unit: Unit = Unit.C, detail: Literal["short", "long"] = "short",
             hours: Optional[list[int]] = None, ratio: float = 1.0, alerts: bool = False) -> dict:
    """Weather forecast for a city.

    More text that is not the summary.

    Args:
        city: the city name,
            as written locally
        days: how many days ahead
    """
    return {}


def test_schema_from_type_hints_and_docstring():
    schema = schema_from_function(forecast)
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "forecast" and function["description"] == "Weather forecast for a city."
    parameters = function["parameters"]
    assert parameters["required"] == ["city", "days"] and parameters["additionalProperties"] is False
    p = parameters["properties"]
    assert p["city"] == {"type": "string", "description": "the city name, as written locally"}
    assert p["days"] == {"type": "integer", "description": "how many days ahead"}
    assert p["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert p["detail"] == {"enum": ["short", "long"], "default": "short"}
    assert p["hours"] == {"type": ["array", "null"], "items": {"type": "integer"}, "default": None}
    assert p["ratio"]["type"] == "number" and p["alerts"]["type"] == "boolean"


def test_validation_accepts_good_and_explains_bad_arguments():
    t = Tool.from_function(forecast)
    assert t.validate('{"city": "Oslo", "days": 3}') == {"city": "Oslo", "days": 3}
    with pytest.raises(ToolArgumentError, match="'days' is a required property"):
        t.validate({"city": "Oslo"})
    with pytest.raises(ToolArgumentError, match="days: 'three' is not of type 'integer'"):
        t.validate({"city": "Oslo", "days": "three"})
    with pytest.raises(ToolArgumentError, match="days: True is not of type 'integer'"):
        t.validate({"city": "Oslo", "days": True})
    with pytest.raises(ToolArgumentError, match="Additional properties"):
        t.validate({"city": "Oslo", "days": 1, "mood": "sunny"})
    with pytest.raises(ToolArgumentError, match="detail: 'medium' is not one of"):
        t.validate({"city": "Oslo", "days": 1, "detail": "medium"})
    with pytest.raises(ToolArgumentError, match="not valid JSON"):
        t.validate("{city: Oslo}")
    with pytest.raises(ToolArgumentError, match="must be a JSON object"):
        t.validate("[1, 2]")


def test_tool_from_openai_schema_dict():
    schema = {"type": "function", "function": {"name": "lookup", "description": "Find a word.",
              "parameters": {"type": "object", "properties": {"word": {"type": "string", "minLength": 2}},
                             "required": ["word"]}}}
    t = as_tool((schema, lambda word: word.upper()))
    assert t.schema() == schema
    assert t.validate({"word": "ox"}) == {"word": "ox"}
    with pytest.raises(ToolArgumentError, match="too short"):
        t.validate({"word": "o"})
    with pytest.raises(Exception):
        Tool.from_schema({"type": "function", "function": {"name": "bad", "parameters": {"type": "nope"}}},
                         function=print)


def test_decorator_options_and_rendering_into_the_prompt():
    @tool(name="weather.forecast", substrate="process")
    def f(city: str) -> str:
        """Forecast."""
        return city

    assert f.name == "weather.forecast" and f.substrate == "process" and f.function("x") == "x"
    prompt = encode_messages([{"role": "user", "content": "hi"}], tools=[f.schema(), shell_tool().schema()])
    assert '"name": "weather.forecast"' in prompt and '"name": "shell"' in prompt


def test_bad_tool_definitions_are_rejected():
    with pytest.raises(TypeError, match="kwargs"):
        schema_from_function(lambda **kw: None)
    with pytest.raises(ValueError, match="exactly one"):
        Tool("t", "", {"type": "object"})
    with pytest.raises(ValueError, match="tool name"):
        Tool("bad name!", "", {"type": "object"}, function=print)
    assert shell_tool().command({"command": "ls -l"}) == ["/bin/sh", "-c", "ls -l"]
