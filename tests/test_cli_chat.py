"""`mlx-dsv4 chat` driven as a user would, on a terminal (pexpect)."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from generate_support import tiny_chat_dir, tiny_chat_model
from mlx_dsv4.chat import encode_messages

pexpect = pytest.importorskip("pexpect")

MLX_DSV4 = str(Path(sys.executable).with_name("mlx-dsv4"))
EOS, USER, ASSISTANT = "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
TURN_STATS = re.compile(r"\[(\d+) new prompt tokens prefilled, (\d+) cached \| (\d+) tokens at [\d.]+ tok/s"
                        r" \| prompt [\d.]+ tok/s \| cache [\d.]+ (?:B|KiB|MiB)(?: \| (\w+))?\]")


def spawn(tmp_path, *extra):
    env = dict(os.environ, HOME=str(tmp_path))
    child = pexpect.spawn(
        MLX_DSV4,
        ["chat", "--model", str(tiny_chat_dir()), "--history-file", str(tmp_path / "history"), *extra],
        encoding="utf-8", timeout=60, env=env, dimensions=(40, 250),
    )
    child.expect(">>> ")
    return child


def turn(child, text):
    child.sendline(text)
    child.expect(TURN_STATS)
    stats = child.match.groups()
    child.expect(">>> ")
    return int(stats[0]), int(stats[1]), int(stats[2]), stats[3]


def command(child, text, expected):
    child.sendline(text)
    child.expect(expected)
    child.expect(">>> ")


def n_tokens(text):
    return len(tiny_chat_model()[1].encode(text))


def test_chat_session(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]))
    saved = tmp_path / "conversation.cache"

    child = spawn(tmp_path, "--max-tokens", "8")
    command(child, "/help", r"/save FILE.*\n(.*\n)*.*/quit")

    new, cached, generated, reason = turn(child, "Hello there")
    assert (new, cached, generated, reason) == (
        n_tokens(encode_messages([{"role": "user", "content": "Hello there"}])), 0, 8, "length")
    first_total = new + generated

    # The second turn prefills only its own tokens: the end of the first reply and the new user turn.
    new, cached, generated, _ = turn(child, "And again")
    assert cached == first_total
    assert new == n_tokens(EOS + USER + "And again" + ASSISTANT + "</think>")
    second_total = cached + new + generated

    command(child, "/think", r"\[thinking mode: think\]")
    new, cached, _, _ = turn(child, "Why")
    assert cached == second_total
    assert new == n_tokens(EOS + USER + "Why" + ASSISTANT + "<think>")
    third_prompt = cached + new

    command(child, f"/tools {tools}", r"\[1 tool\(s\): get_weather\]")
    command(child, "/tools", r"get_weather: Weather for a city")
    command(child, "/tools off", r"\[tools removed\]")
    command(child, "/think nonsense", r"unknown mode")
    command(child, "/bogus", r"unknown command /bogus")
    command(child, f"/save {saved}", r"\[saved 6 messages and a cache of \d+ tokens")
    assert saved.is_file()

    command(child, "/reset", r"\[conversation and cache cleared\]")
    new, cached, _, _ = turn(child, "Hello there")
    assert cached == 0 and new == first_total - 8

    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Hello there" in (tmp_path / "history").read_text()

    # A new process resumes the saved conversation from the file; Ctrl-C stops a long reply.
    child = spawn(tmp_path, "--max-tokens", "100000")
    command(child, f"/load {saved}", r"\[loaded 6 messages and a cache of \d+ tokens; thinking mode think\]")
    child.sendline("Continue")
    child.expect(r"\S{12}")  # the reply is streaming
    child.sendintr()
    child.expect(TURN_STATS)
    new, cached, _, reason = child.match.groups()
    child.expect(">>> ")
    assert reason == "interrupted"
    # Thinking mode drops the last reply's reasoning from the history, so the snapshot
    # taken before the third prompt's final "<think>" token is the one that matches.
    assert int(cached) == third_prompt - 1
    assert int(new) == n_tokens("</think>" + EOS + USER + "Continue" + ASSISTANT + "<think>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_at_the_prompt_and_bad_files(tmp_path):
    child = spawn(tmp_path)
    child.sendintr()
    child.expect(r"Ctrl-D or /quit leaves")
    child.expect(">>> ")
    command(child, f"/load {tmp_path / 'missing.cache'}", r"error: .*no such prompt cache file")
    (tmp_path / "bad.json").write_text("{not json")
    command(child, f"/tools {tmp_path / 'bad.json'}", r"error: ")
    command(child, f"/save {tmp_path / 'x.cache'}", r"nothing to save yet")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
