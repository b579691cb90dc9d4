"""The two example agents, driven by scripted completions."""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from mlx_dsv4.agent import SubstrateUnavailable, read_log
from mlx_dsv4.chat import tool_calls_to_dsml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import agent_todo_finder  # noqa: E402
import agent_weather_calculator  # noqa: E402


def calls(*pairs):
    return "\n\n" + tool_calls_to_dsml(
        [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a in pairs])


def scripted(*texts):
    texts, prompts = list(texts), []

    def complete(prompt):
        prompts.append(prompt)
        yield from texts.pop(0)

    complete.prompts = prompts
    return complete


def test_weather_calculator_uses_both_tools(tmp_path):
    complete = scripted(
        calls(("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo", "units": "kelvin"})),
        calls(("get_weather", {"city": "Oslo"}), ("calculate", {"expression": "18.5 - 9.0"})),
        "Paris is warmer by 9.5 °C.",
    )
    agent = agent_weather_calculator.build_agent(None, None, completion_fn=complete, log_path=tmp_path / "w.jsonl")
    with agent:
        result = agent.run("Warmer in Paris or Oslo?")
    assert result.content == "Paris is warmer by 9.5 °C."
    assert [(c.name, c.result.status) for c in result.tool_calls] == [
        ("get_weather", "ok"), ("get_weather", "invalid"), ("get_weather", "ok"), ("calculate", "ok")]
    assert result.tool_calls[0].result.value["conditions"] == "light rain"
    assert result.tool_calls[3].result.value == 9.5
    assert "'kelvin' is not one of" in complete.prompts[1]
    assert sum(r["event"] == "tool" for r in read_log(tmp_path / "w.jsonl")) == 4


def test_weather_calculator_without_a_model_runs_the_trained_one(capsys):
    assert agent_weather_calculator.main([]) == 0
    out = capsys.readouterr()
    assert "tiny trained model" in out.err
    assert '[tool get_weather({"city": "Oslo"}) -> ok: {"city": "Oslo", "temperature": 9.0' in out.out
    assert 'Oslo is at 9.0 °C with "overcast".' in out.out
    assert "[final after 2 step(s), 1 tool call(s)]" in out.out


def test_calculator_refuses_code():
    with pytest.raises(ValueError, match="unsupported"):
        agent_weather_calculator.calculate("__import__('os').system('id')")
    assert agent_weather_calculator.calculate("2 ** 10 - (3 * 4) / 2") == 1018.0


def bwrap_ready():
    try:
        from mlx_dsv4.agent import SandboxSubstrate

        SandboxSubstrate().close()
        return True
    except SubstrateUnavailable:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not bwrap_ready(), reason="needs a working bubblewrap")
def test_todo_finder_greps_a_repo_in_the_sandbox():
    repo = Path(tempfile.mkdtemp(prefix="agent-repo-"))
    try:
        os.chmod(repo, 0o755)
        (repo / "src").mkdir()
        (repo / "src" / "main.py").write_text("x = 1\n# TODO: handle errors\n")
        (repo / "README.md").write_text("Nothing here.\n")
        for path in (repo / "src", repo / "src" / "main.py", repo / "README.md"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        complete = scripted(
            calls(("shell", {"command": f"grep -rn TODO {repo}"})),
            calls(("shell", {"command": f"rm -rf {repo}/src; curl -s http://example.com; cat /etc/shadow"})),
            f"{repo}/src/main.py:2: TODO: handle errors",
        )
        agent = agent_todo_finder.build_agent(None, None, repo, completion_fn=complete)
        with agent:
            result = agent.run("Find the TODOs.")
        found, attack = result.tool_calls
        assert found.result.status == "ok" and "src/main.py:2:# TODO: handle errors" in found.result.output
        assert attack.result.status == "error"
        assert (repo / "src" / "main.py").exists()  # the repository is read-only in the sandbox
        assert result.content.endswith("TODO: handle errors")
    finally:
        shutil.rmtree(repo, ignore_errors=True)
