"""One runtime configuration file (YAML, or JSON, which YAML reads too) for generate, chat,
serve and the agent API.

``mlx-dsv4 --config FILE generate|chat|serve`` takes its settings as the command's defaults:
flags given on the command line win. ``load_config(path)`` reads and checks a file and
returns a ``RuntimeConfig``; every problem names the key and its line. ``TEMPLATE`` is the
commented file ``mlx-dsv4 config init`` writes.
"""

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .cli.common import DRAFTERS
from .memory import INDEX_DTYPES, KV_DTYPES
from .sizes import parse_size

THINKING_MODES = ("chat", "think", "think-max")
ISOLATIONS = ("function", "process", "sandbox", "container", "microvm", "vm", "trusted", "untrusted")
COMMANDS = ("generate", "chat", "serve")


class ConfigFileError(ValueError):
    """Problems of one configuration file, each as (line or None, key path, message)."""

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> List[str]:
        out = []
        for line, key, message in self.problems:
            where = f"{self.path}:{line}" if line else self.path
            out.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        return out


# -- value checks: each returns the value to use or raises ValueError with the problem ---------

def _choice(options):
    def check(value):
        if value not in options:
            raise ValueError(f"must be one of {', '.join(map(str, options))}, got {value!r}")
        return value
    return check


def _integer(low=None, high=None):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            raise ValueError(f"must be in {bounds}, got {value}")
        return value
    return check


def _number(low=None, high=None, low_open=False):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be a number, got {value!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise ValueError(f"must be {'above' if low_open else 'at least'} {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"must be at most {high}, got {value}")
        return float(value)
    return check


def _boolean(value):
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _text(value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _size(value):
    if isinstance(value, bool):
        raise ValueError(f"must be a size such as 8G or 512MB, got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as err:
            raise ValueError(str(err)) from None
    raise ValueError(f"must be a size such as 8G or 512MB, got {value!r}")


def _size_or_auto(value):
    return "auto" if value == "auto" else _size(value)


def _strings(value):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a string or a list of strings, got {value!r}")
    return value


def _directory_or_none(value):
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return "none"
    return _text(value)


def _tool_isolations(value):
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("must map tool names to an isolation")
    for name, isolation in value.items():
        if isolation not in ISOLATIONS:
            raise ValueError(f"tool {name!r}: must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
    return dict(value)


@dataclass(frozen=True)
class Setting:
    check: Callable[[Any], Any]
    dest: Optional[str]  # the argparse destination it sets (None: not a command-line setting)
    commands: Tuple[str, ...] = COMMANDS
    convert: Callable[[Any], Any] = lambda v: v
    help: str = ""


# key path -> setting. Keys of sections are "section.key".
SETTINGS: Dict[str, Setting] = {
    "model": Setting(_text, "model", convert=Path, help="checkpoint directory (converted or official layout)"),
    "context": Setting(_integer(1), "max_context", ("serve",), help="longest prompt + completion in tokens"),
    "kv_precision": Setting(_choice(KV_DTYPES), "kv_dtype",
                            help="KV rows: fp8 (as trained; RoPE dims stay bf16), bf16 or float"),
    "rope_precision": Setting(_choice(("bf16", "float")), None,
                              help="the RoPE dims of stored rows: bf16 with fp8 or bf16 kv, float with float kv"),
    "indexer_precision": Setting(_choice(INDEX_DTYPES), "index_dtype",
                                 help="indexer keys: fp4 (as trained, Hadamard-rotated), fp8, bf16 or float"),
    "tool_schema": Setting(_choice(("dsml",)), None, help="how tool calls are written: V4's DSML"),
    "kv_cache_limit": Setting(_size_or_auto, "max_kv_size",
                              help="memory guard for the KV cache: a size, or auto (free memory after the weights)"),
    "thinking": Setting(_choice(THINKING_MODES), "thinking", ("generate", "chat"),
                        help="reasoning mode: chat, think or think-max"),
    "interleaved_thinking": Setting(_boolean, "keep_reasoning", ("generate", "chat"),
                                    help="keep the reasoning of earlier turns in the prompt"),
    "sampling.temperature": Setting(_number(0), "temperature"),
    "sampling.top_p": Setting(_number(0, 1, low_open=True), "top_p"),
    "sampling.top_k": Setting(_integer(0), "top_k"),
    "sampling.min_p": Setting(_number(0, 1), "min_p"),
    "sampling.max_tokens": Setting(_integer(1), "max_tokens"),
    "sampling.repetition_penalty": Setting(_number(0, low_open=True), "repetition_penalty"),
    "sampling.seed": Setting(_integer(0, 2 ** 64 - 1), "seed", ("generate", "chat")),
    "server.host": Setting(_text, "host", ("serve",)),
    "server.port": Setting(_integer(1, 65535), "port", ("serve",)),
    "server.api_keys": Setting(_strings, "api_key", ("serve",)),
    "server.allowed_hosts": Setting(_strings, "allowed_hosts", ("serve",), convert=",".join),
    "server.served_model_name": Setting(_text, "served_model_name", ("serve",)),
    "server.max_queue": Setting(_integer(1), "max_queue", ("serve",)),
    "server.max_batch": Setting(_integer(1), "max_batch", ("serve",)),
    "server.sse_keepalive": Setting(_number(0, low_open=True), "sse_keepalive", ("serve",)),
    "draft.mode": Setting(_choice(DRAFTERS), "draft"),
    "draft.num_draft": Setting(_integer(1, 8), "num_draft"),
    "prompt_cache.memory": Setting(_size, "prompt_cache_bytes", ("chat", "serve")),
    "prompt_cache.dir": Setting(_directory_or_none, "prompt_cache_dir", ("chat", "serve")),
    "prompt_cache.disk": Setting(_size, "prompt_cache_disk_bytes", ("chat", "serve")),
    "agent.default_isolation": Setting(_choice(ISOLATIONS), None, ()),
    "agent.tools": Setting(_tool_isolations, None, ()),
}
SECTIONS = sorted({key.split(".")[0] for key in SETTINGS if "." in key})


@dataclass
class RuntimeConfig:
    path: Optional[Path]
    values: Dict[str, Any] = field(default_factory=dict)  # checked values by key path

    def command_defaults(self, command: str) -> Dict[str, Any]:
        """argparse destination -> value, for the settings ``command`` takes."""
        out = {}
        for key, value in self.values.items():
            setting = SETTINGS[key]
            if setting.dest is not None and command in setting.commands:
                out[setting.dest] = setting.convert(value)
        return out

    def agent_options(self) -> Dict[str, Any]:
        """Keyword arguments of ``mlx_dsv4.agent.Agent`` this file sets."""
        options = {}
        if "agent.default_isolation" in self.values:
            options["substrate"] = self.values["agent.default_isolation"]
        if "agent.tools" in self.values:
            options["tool_substrates"] = dict(self.values["agent.tools"])
        if "thinking" in self.values:
            options["thinking_mode"] = "chat" if self.values["thinking"] == "chat" else "thinking"
            if self.values["thinking"] == "think-max":
                options["reasoning_effort"] = "max"
        for key, name in (("sampling.temperature", "temperature"), ("sampling.max_tokens", "max_tokens"),
                          ("draft.mode", "draft"), ("draft.num_draft", "num_draft")):
            if key in self.values:
                options[name] = self.values[key]
        return options


def _line_map(node, prefix="", lines=None):
    """key path -> 1-based line of the key, from a composed YAML node."""
    import yaml

    lines = {} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode) and (prefix == "" and key in SECTIONS):
                _line_map(value_node, key, lines)
    return lines


def parse_config(text: str, path="<config>") -> RuntimeConfig:
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigFileError(path, [(mark.line + 1 if mark else None, None, f"not valid YAML: {problem}")]) from None
    if data is None:
        return RuntimeConfig(Path(path) if path != "<config>" else None)
    if not isinstance(data, dict):
        raise ConfigFileError(path, [(1, None, f"must be a mapping of settings, got {type(data).__name__}")])
    lines = _line_map(node)
    problems, values = [], {}
    flat = []
    for key, value in data.items():
        key = str(key)
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append((lines.get(key), key, "must be a section of settings (a mapping)"))
                continue
            flat += [(f"{key}.{sub}", subvalue) for sub, subvalue in value.items()]
        else:
            flat.append((key, value))
    for key, value in flat:
        setting = SETTINGS.get(key)
        if setting is None:
            close = difflib.get_close_matches(key, list(SETTINGS), n=1, cutoff=0.75)
            close = close or [k for k in SETTINGS if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append((lines.get(key), key, f"unknown setting{hint}"))
            continue
        try:
            values[key] = setting.check(value)
        except ValueError as err:
            problems.append((lines.get(key), key, str(err)))
    kv, rope = values.get("kv_precision", "fp8"), values.get("rope_precision")
    kv_bad = any(key == "kv_precision" for _, key, _ in problems)
    if rope is not None and not kv_bad and rope != ("float" if kv == "float" else "bf16"):
        problems.append((lines.get("rope_precision"), "rope_precision",
                         f"{rope} does not go with kv_precision {kv}: V4 keeps the RoPE dims of "
                         f"{'fp8 and bf16' if kv != 'float' else 'float'} rows in "
                         f"{'bf16' if kv != 'float' else 'float'}"))
    if problems:
        raise ConfigFileError(path, sorted(problems, key=lambda p: (p[0] or 0, p[1] or "")))
    return RuntimeConfig(Path(path) if path != "<config>" else None, values)


def load_config(path) -> RuntimeConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(path, [(None, None, "no such file")]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigFileError(path, [(None, None, f"cannot be read: {err}")]) from None
    return parse_config(text, path)


TEMPLATE = """\
# mlx-dsv4 runtime configuration: `mlx-dsv4 --config THIS_FILE generate|chat|serve`.
# Every setting is optional; flags on the command line override this file.

model: dsv4-flash-q2            # checkpoint directory (converted or the official layout)
context: 131072                 # serve: longest prompt + completion in tokens
kv_precision: fp8               # KV rows: fp8 (as trained), bf16, float
rope_precision: bf16            # RoPE dims of stored rows: bf16 (fp8/bf16 kv) or float (float kv)
indexer_precision: fp4          # indexer keys: fp4 (as trained), fp8, bf16, float
tool_schema: dsml               # tool calls in V4's DSML
kv_cache_limit: auto            # memory guard: a size (8G = 2^33 bytes, 8GB = 8e9) or auto
thinking: chat                  # generate and chat: chat, think or think-max
interleaved_thinking: true      # keep earlier turns' reasoning in the prompt

sampling:
  temperature: 0.6
  top_p: 0.95
  max_tokens: 4096

server:
  host: 127.0.0.1
  port: 8080
  # api_keys: [change-me]       # each key has its own prompt-cache partition
  sse_keepalive: 5

draft:                          # speculative decoding (generate, chat, serve, the agent API)
  mode: none                    # none or mtp (the checkpoint's MTP layer drafts)
  num_draft: 3

prompt_cache:                   # chat and serve: the prefix store
  memory: 2G
  # dir: ~/.cache/mlx-dsv4/prompt-cache   (none: memory only)
  disk: 16G

agent:                          # the agent API (Agent(**config.agent_options(), ...))
  default_isolation: process    # function, process, sandbox, container, microvm or vm
  tools: {}                     # per tool: {name: isolation}; trusted = function, untrusted = microvm
"""
