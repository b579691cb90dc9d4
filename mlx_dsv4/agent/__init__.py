"""On-device agent loop with validated, sandboxed tools.

``Agent(model, tokenizer, tools=[...], substrate=...)`` renders the tools into the V4
prompt, generates, parses DSML tool calls while streaming, validates the arguments
against each tool's JSON schema, runs the tool in its execution substrate, appends the
result and continues until a final answer or ``max_steps``. Every step is logged as
JSON Lines.

Tools: ``tool`` / ``Tool.from_function`` (schema from type hints and docstring),
``Tool.from_schema`` (an OpenAI function tool dict), ``shell_tool``.
Substrates: ``function``, ``process``, ``sandbox``, ``container``, ``microvm``, ``vm``.
"""

from .log import StepLog, read_log
from .loop import Agent, AgentResult, ToolCallRecord
from .substrates import (
    ContainerSubstrate,
    ExecutionResult,
    FunctionSubstrate,
    Limits,
    MicroVMSubstrate,
    ProcessSubstrate,
    SandboxSubstrate,
    Substrate,
    SubstrateUnavailable,
    VMSubstrate,
    make_substrate,
)
from .tools import Tool, ToolArgumentError, as_tool, schema_from_function, shell_tool, tool

__all__ = [
    "Agent",
    "AgentResult",
    "ContainerSubstrate",
    "ExecutionResult",
    "FunctionSubstrate",
    "Limits",
    "MicroVMSubstrate",
    "ProcessSubstrate",
    "SandboxSubstrate",
    "StepLog",
    "Substrate",
    "SubstrateUnavailable",
    "VMSubstrate",
    "Tool",
    "ToolArgumentError",
    "ToolCallRecord",
    "as_tool",
    "make_substrate",
    "read_log",
    "schema_from_function",
    "shell_tool",
    "tool",
]
