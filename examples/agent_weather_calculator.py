"""A two-tool agent: current weather (a local table) and a safe calculator.

    python examples/agent_weather_calculator.py [--model DIR] ["Is it warmer in Paris or Oslo, by how much?"]

Without --model it runs the tiny V4 shipped in the package, trained on synthetic weather and
arithmetic questions: it answers one question with one call ("What is the weather in Oslo?", the
default question without --model), not comparisons. Point --model at a converted DeepSeek-V4
checkpoint for real answers.
"""

import argparse
import ast
import operator
import sys
from pathlib import Path

from mlx_dsv4.cli.common import add_draft_arguments, load_options
from typing import Literal

WEATHER = {
    "paris": {"temperature_c": 18.5, "conditions": "light rain"},
    "oslo": {"temperature_c": 9.0, "conditions": "overcast"},
    "cairo": {"temperature_c": 31.0, "conditions": "sunny"},
    "tokyo": {"temperature_c": 22.0, "conditions": "clear"},
}


def get_weather(city: str, units: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Current weather in a city.

    Args:
        city: city name, e.g. "Paris"
        units: temperature units
    """
    entry = WEATHER.get(city.strip().lower())
    if entry is None:
        raise ValueError(f"no weather data for {city!r}; known cities: {', '.join(sorted(WEATHER))}")
    temperature = entry["temperature_c"]
    if units == "fahrenheit":
        temperature = temperature * 9 / 5 + 32
    return {"city": city, "temperature": round(temperature, 1), "units": units, "conditions": entry["conditions"]}


_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def calculate(expression: str) -> float:
    """Evaluate an arithmetic expression (+ - * / // % ** and parentheses).

    Args:
        expression: the expression, e.g. "(18.5 - 9) * 2"
    """
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"unsupported expression element: {ast.dump(node)[:60]}")

    return value(ast.parse(expression, mode="eval").body)


def build_agent(model, tokenizer, **options):
    from mlx_dsv4.agent import Agent

    return Agent(
        model, tokenizer, tools=[get_weather, calculate], substrate="function",
        system="You answer questions about the weather. Use the tools for data and arithmetic.",
        **options,
    )


def print_events(event):
    from mlx_dsv4.chat import ContentDelta, ReasoningDelta

    if isinstance(event, (ReasoningDelta, ContentDelta)):
        print(event.text, end="", flush=True)
    elif isinstance(event, tuple) and event[0] == "tool_result":
        record = event[1]
        print(f"\n[tool {record.name}({record.arguments}) -> {record.result.status}: "
              f"{record.result.to_content(200)}]", flush=True)


def load_model_or_trained(path, **load_options):
    """Load the checkpoint at `path`, or the tiny trained one shipped in the package when none is
    given (``load_options``: of ``mlx_dsv4.load``, e.g. mtp=True to draft with its MTP layer)."""
    from mlx_dsv4 import load
    from mlx_dsv4.train import trained_checkpoint

    if path is None:
        path = trained_checkpoint()
        print("Using the tiny trained model: it knows only its synthetic tasks.", file=sys.stderr)
    return load(path, **load_options)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?",
                        help="default: a comparison of Paris and Oslo; with the tiny trained model, Oslo's weather")
    parser.add_argument("--model", type=Path, help="converted checkpoint (default: the tiny trained one)")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--thinking", choices=["chat", "thinking"], default="chat")
    parser.add_argument("--log", type=Path, help="JSONL step log")
    add_draft_arguments(parser, what="each step")
    args = parser.parse_args(argv)

    model, tokenizer = load_model_or_trained(args.model, **load_options(args))
    if args.question is None:
        args.question = ("What is the weather in Oslo?" if args.model is None
                         else "Is it warmer in Paris or Oslo, and by how many degrees?")
    with build_agent(model, tokenizer, max_steps=args.max_steps, max_tokens=args.max_tokens,
                     thinking_mode=args.thinking, log_path=args.log, on_event=print_events,
                     draft=args.draft, num_draft=args.num_draft) as agent:
        result = agent.run(args.question)
    print(f"\n[{result.stop_reason} after {result.steps} step(s), {len(result.tool_calls)} tool call(s)]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
