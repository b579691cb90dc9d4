"""The runtime configuration file: the template, precedence of flags over the file, every kind
of bad value named with its key and line, and what generate and the agent API take from it."""

import json

import pytest

from mlx_dsv4.cli import _apply_config, build_parser, main
from mlx_dsv4.runtime_config import TEMPLATE, ConfigFileError, load_config, parse_config


def parsed(tmp_path, text, argv):
    path = tmp_path / "dsv4.yaml"
    path.write_text(text)
    parser = build_parser()
    argv = ["--config", str(path), *argv]
    assert _apply_config(parser, argv) == 0
    return parser.parse_args(argv)


def test_the_template_is_valid_and_init_does_not_overwrite(tmp_path, capsys):
    config = parse_config(TEMPLATE)
    assert config.values["kv_precision"] == "fp8" and config.values["kv_cache_limit"] == "auto"
    path = tmp_path / "dsv4.yaml"
    assert main(["config", "init", str(path)]) == 0
    assert path.read_text() == TEMPLATE
    assert main(["config", "init", str(path)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["config", "check", str(path)]) == 0


CONFIG = """
model: /models/dsv4
kv_precision: bf16
indexer_precision: fp8
kv_cache_limit: 8G
thinking: think-max
interleaved_thinking: true
sampling: {temperature: 0.3, max_tokens: 7, top_k: 40}
server: {host: 0.0.0.0, port: 9000, api_keys: [k1, k2], allowed_hosts: [box.local]}
draft: {mode: mtp, num_draft: 4}
prompt_cache: {memory: 1G, dir: none}
"""


def test_the_file_sets_defaults_and_flags_win(tmp_path):
    args = parsed(tmp_path, CONFIG, ["generate", "--prompt", "hi"])
    assert str(args.model) == "/models/dsv4"  # --model is no longer required
    assert (args.kv_dtype, args.index_dtype, args.max_kv_size) == ("bf16", "fp8", 8 << 30)
    assert (args.temperature, args.max_tokens, args.top_k) == (0.3, 7, 40)
    assert (args.thinking, args.keep_reasoning, args.draft, args.num_draft) == ("think-max", True, "mtp", 4)
    args = parsed(tmp_path, CONFIG, ["generate", "--prompt", "hi", "--temp", "0.9", "--kv-dtype", "fp8",
                                     "--model", "/elsewhere", "--num-draft", "2"])
    assert (args.temperature, args.kv_dtype, str(args.model), args.num_draft) == (0.9, "fp8", "/elsewhere", 2)
    args = parsed(tmp_path, CONFIG, ["serve"])
    assert (args.host, args.port, args.api_key, args.allowed_hosts) == ("0.0.0.0", 9000, ["k1", "k2"], "box.local")
    assert (args.prompt_cache_bytes, args.prompt_cache_dir) == (1 << 30, "none")
    args = parsed(tmp_path, CONFIG, ["serve", "--port", "9100"])
    assert args.port == 9100
    args = parsed(tmp_path, CONFIG, ["chat"])
    assert args.prompt_cache_bytes == 1 << 30 and args.thinking == "think-max"


def test_the_draft_section_sets_chat_and_serve_too(tmp_path):
    for command in (["chat"], ["serve"]):
        args = parsed(tmp_path, CONFIG, command)
        assert (args.draft, args.num_draft) == ("mtp", 4)
        args = parsed(tmp_path, CONFIG, [*command, "--draft", "none", "--num-draft", "2"])
        assert (args.draft, args.num_draft) == ("none", 2)
    assert parse_config(CONFIG).agent_options() == {"thinking_mode": "thinking", "reasoning_effort": "max",
                                                    "temperature": 0.3, "max_tokens": 7, "draft": "mtp",
                                                    "num_draft": 4}


BAD = [
    ("model: x\nflavour: strong\n", 2, "flavour", "unknown setting"),
    ("sampling:\n  temperture: 1\n", 2, "sampling.temperture", "did you mean sampling.temperature"),
    ("sampling:\n  max_tokens: many\n", 2, "sampling.max_tokens", "must be an integer"),
    ("sampling:\n  top_p: 2\n", 2, "sampling.top_p", "at most 1"),
    ("sampling:\n  temperature: .nan\n", 2, "sampling.temperature", "must be a number"),
    ("kv_precision: fp16\n", 1, "kv_precision", "must be one of fp8, bf16, float"),
    ("indexer_precision: int4\n", 1, "indexer_precision", "must be one of fp4"),
    ("kv_precision: fp8\nrope_precision: float\n", 2, "rope_precision", "does not go with kv_precision fp8"),
    ("kv_precision: float\nrope_precision: bf16\n", 2, "rope_precision", "does not go with kv_precision float"),
    ("kv_cache_limit: lots\n", 1, "kv_cache_limit", "not a size"),
    ("server: 5\n", 1, "server", "must be a section"),
    ("server:\n  port: 70000\n", 2, "server.port", "1..65535"),
    ("server:\n  api_keys: [1, 2]\n", 2, "server.api_keys", "list of strings"),
    ("draft:\n  num_draft: 9\n", 2, "draft.num_draft", "1..8"),
    ("interleaved_thinking: yes please\n", 1, "interleaved_thinking", "true or false"),
    ("tool_schema: json\n", 1, "tool_schema", "must be one of dsml"),
    ("agent:\n  tools: {shell: hypervisor}\n", 2, "agent.tools", "tool 'shell'"),
    ("prompt_cache:\n  memory: -5\n", 2, "prompt_cache.memory", "size"),
    ("- model\n- x\n", 1, None, "must be a mapping"),
    ("model: [unclosed\n", 2, None, "not valid YAML"),
    ('{\n  "model": "x",\n  "context": 0\n}\n', 3, "context", "must be in 1..inf"),
]


@pytest.mark.parametrize("text, line, key, words", BAD)
def test_every_bad_value_is_named_with_its_key_and_line(tmp_path, text, line, key, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem[0] == line and problem[1] == key and words in problem[2], problem
    assert caught.value.lines()[0].startswith(f"{path}:{line}: ")


def test_all_problems_are_reported_and_commands_refuse_a_bad_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("kv_precision: fp16\nsampling:\n  top_k: -1\nserver:\n  port: x\n")
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1] for line in err] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert main(["--config", str(path), "generate", "--prompt", "hi"]) == 2
    assert main(["--config", str(tmp_path / "missing.yaml"), "chat"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_generate_runs_from_the_file(tmp_path, capsys):
    from generate_support import tiny_chat_dir

    path = tmp_path / "dsv4.yaml"
    path.write_text(f"model: {tiny_chat_dir()}\nkv_precision: bf16\nsampling:\n  temperature: 0\n  max_tokens: 3\n")
    assert main(["--config", str(path), "generate", "--prompt", "Hello", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["usage"]["completion_tokens"] == 3


def test_the_agent_takes_its_isolation_from_the_file():
    from mlx_dsv4.agent import Agent

    def add(a: int, b: int) -> int:
        """Adds."""
        return a + b

    def ping() -> str:
        """Pings."""
        return "pong"

    config = parse_config("agent:\n  default_isolation: process\n  tools: {add: function}\n"
                          "thinking: think\nsampling: {temperature: 0.5, max_tokens: 64}\n")
    agent = Agent(tools=[add, ping], completion_fn=lambda prompt: iter(()), **config.agent_options())
    assert (agent.draft, agent.num_draft) == ("none", 3)
    assert agent.substrate_for(agent.tools["add"]).name == "function"
    assert agent.substrate_for(agent.tools["ping"]).name == "process"
    assert (agent.thinking_mode, agent.temperature, agent.max_tokens) == ("thinking", 0.5, 64)
    with pytest.raises(ValueError, match="'shell', which is not among the tools"):
        Agent(tools=[add], completion_fn=lambda prompt: iter(()), tool_substrates={"shell": "sandbox"})


def test_auto_kv_limit_is_what_remains_after_the_weights(monkeypatch):
    from generate_support import tiny_chat_model
    from mlx_dsv4 import device_memory

    model, _ = tiny_chat_model()
    monkeypatch.setattr(device_memory, "machine_memory",
                        lambda: device_memory.MachineMemory(16 << 30, 10 << 30, "test"))
    assert device_memory.auto_kv_limit(model) == (10 << 30) - device_memory.model_bytes(model) - (1 << 30)
    model.set_cache_dtypes("bf16", "fp8")
    try:
        cache = model.make_cache()
        assert (cache.kv_dtype, cache.index_dtype) == ("bf16", "fp8")
        with pytest.raises(ValueError, match="kv_dtype 'fp16'"):
            model.set_cache_dtypes("fp16", "fp4")
    finally:
        model.set_cache_dtypes("fp8", "fp4")
