"""The CLI as a user runs it, and the README/CI contract."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import mlx_dsv4

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "mlx_dsv4.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_on_the_trained_model_answers_through_a_real_tool_call():
    start = time.perf_counter()
    out = cli("demo")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert elapsed < 90
    assert "random" not in out.stdout
    lookup = re.search(r"long prompt: (\d+) tokens of key: value lines, .* -> '(\d+)' \(the list says (\d+)\)",
                       out.stdout)
    assert lookup and int(lookup.group(1)) > 512 and lookup.group(2) == lookup.group(3), out.stdout
    assert re.search(r"decode: 63 cached steps in [\d.]+ s = [\d.]+ tok/s", out.stdout)
    chat = r"chat turn: 'Who are you\?' -> 'I am a small assistant model\..*' \[\d+ prompt tokens, finish: stop\]"
    assert re.search(chat, out.stdout), out.stdout
    agent = re.search(r"agent: '(.+)' -> called (\w+)\((.+)\) -> (.+); final answer '(.+)'; steps logged", out.stdout)
    assert agent, out.stdout
    question, tool, arguments, result, answer = agent.groups()
    assert "scripted" not in out.stdout
    assert (tool, json.loads(arguments)) == ("add", {"a": 20, "b": 22}) and result == "42", out.stdout
    assert question == "How much is 20 + 22?" and answer == "20 + 22 = 42."
    assert re.search(r"restored run reused \d+ tokens and matches the uninterrupted generation \('939'\)", out.stdout)


def test_demo_runs_under_a_minute_and_reports_speed_and_cache(tmp_path):
    start = time.perf_counter()
    out = cli("demo", "--dir", str(tmp_path / "tiny"))
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert elapsed < 60
    assert re.search(r"prompt: 300 tokens in [\d.]+ s = [\d.]+ tok/s", out.stdout)
    assert re.search(r"decode: 63 cached steps in [\d.]+ s = [\d.]+ tok/s", out.stdout)
    cache = re.search(r"cache: (\d+) bytes for 363 tokens \(kv rows in fp8, indexer keys in fp4\)", out.stdout)
    assert cache and int(cache.group(1)) > 0
    assert "random weights: the text is random" in out.stdout
    assert re.search(r"chat turn .*\[\d+ prompt tokens, finish: (length|stop)\]", out.stdout)
    assert 'called add({"a": 20, "b": 22}) -> 42; final answer \'20 + 22 = 42.\'' in out.stdout
    assert "scripted model output" in out.stdout
    assert re.search(r"restored run reused \d+ tokens and matches the uninterrupted generation", out.stdout)
    mlx_dsv4.load_model(tmp_path / "tiny")  # the checkpoint it wrote is a real one


def test_make_tiny_writes_requested_schedule(tmp_path):
    out = cli("make-tiny", str(tmp_path / "t"), "--layers", "128,4,0", "--vocab-size", "300", "--seed", "3")
    assert out.returncode == 0, out.stderr
    model = mlx_dsv4.load_model(tmp_path / "t")
    assert model.args.compress_ratios == [128, 4, 0] and model.args.vocab_size == 300


def test_no_subcommand_prints_help():
    out = cli()
    assert out.returncode == 2 and "demo" in out.stdout


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.+?)\n```", readme)
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd[0] in ci_lines
    assert any("mlx-dsv4 demo" in c for c in commands)
