"""`mlx-dsv4 chat` driven as a user would, on a terminal (pexpect)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from generate_support import BAD_SAMPLING_FLAGS, config_only_dir, default_sigint, tiny_chat_dir, tiny_chat_model
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
        encoding="utf-8", preexec_fn=default_sigint, timeout=60, env=env, dimensions=(40, 250),
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


def rewritten(source, target, **header_fields):
    """A copy of the prompt-cache file `source` with some header fields replaced."""
    import mlx.core as mx

    arrays, header = mx.load(str(source), format="safetensors", return_metadata=True)
    mx.save_safetensors(str(target), arrays, metadata=dict(header, **header_fields))
    return target


def test_failed_commands_keep_the_conversation(tmp_path):
    saved = tmp_path / "conversation.safetensors"
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    child = spawn(tmp_path, "--max-tokens", "8")
    new, cached, generated, _ = turn(child, "Hello there")
    total = new + cached + generated
    command(child, f"/save {saved}", r"\[saved 2 messages")

    missing = tmp_path / "missing" / "x.cache"
    command(child, f"/save {missing}", rf"error: {missing}: cannot write the prompt cache: "
                                       rf"the folder {missing.parent} does not exist")
    command(child, f"/save {tmp_path}", rf"error: {tmp_path}: cannot write the prompt cache")
    broken = rewritten(saved, tmp_path / "broken.safetensors", snapshots="[{")
    command(child, f"/load {broken}", rf"error: {broken}: the header field 'snapshots' is not valid JSON")
    unknown = rewritten(saved, tmp_path / "unknown.safetensors", fingerprint="")
    command(child, f"/load {unknown}", rf"error: {unknown}: the file names no model fingerprint")
    truncated = tmp_path / "truncated.cache"
    truncated.write_bytes(saved.read_bytes()[:-100])
    command(child, f"/load {truncated}", rf"error: {truncated}: ")
    for name, state in [("no_list", {"messages": "Hi"}), ("bad_role", {"messages": [{"role": "robot"}]}),
                        ("list_role", {"messages": [{"role": ["user"]}]}),
                        ("bad_mode", {"messages": [], "thinking": ["think"]}), ("no_object", ["Hi"])]:
        bad = rewritten(saved, tmp_path / f"{name}.safetensors", metadata=json.dumps({"chat": state}))
        command(child, f"/load {bad}", rf"error: {bad}: ")
    command(child, f"/tools {deep}", rf"error: {deep}: not valid JSON")
    command(child, f"/tools {tmp_path / 'none.json'}", rf"error: {tmp_path / 'none.json'}: cannot read it")
    command(child, f"/tools {tmp_path}", rf"error: {tmp_path}: cannot read it")

    # The next turn extends the first: its messages and its cache are still there.
    new, cached, _, _ = turn(child, "And again")
    assert cached == total
    assert new == n_tokens(EOS + USER + "And again" + ASSISTANT + "</think>")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_history_file_that_cannot_be_written_is_reported(tmp_path):
    history = tmp_path / "missing" / "history"
    env = dict(os.environ, HOME=str(tmp_path))
    child = pexpect.spawn(MLX_DSV4, ["chat", "--model", str(tiny_chat_dir()), "--history-file", str(history)],
                          encoding="utf-8", preexec_fn=default_sigint, timeout=60, env=env, dimensions=(40, 250))
    child.expect(">>> ")
    child.sendline("/quit")
    child.expect(rf"error: cannot write the history file {history}: the folder {history.parent} does not exist")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("flags,message", BAD_SAMPLING_FLAGS)
def test_bad_sampling_flags_are_refused_before_loading(tmp_path, capsys, flags, message):
    from mlx_dsv4.cli import main

    code = main(["chat", "--model", str(config_only_dir(tmp_path)), *flags])
    _, err = capsys.readouterr()
    assert code == 2
    assert re.fullmatch(f"error: {message}\n", err)


def test_a_bad_tools_file_is_refused_before_loading(tmp_path, capsys):
    from mlx_dsv4.cli import main

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    code = main(["chat", "--model", str(config_only_dir(tmp_path)), "--tools", str(deep)])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith(f"error: --tools: {deep}: not valid JSON")


def test_a_line_that_is_not_utf8_is_refused_and_the_session_goes_on(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), PYTHONIOENCODING="utf-8:strict")
    run = subprocess.run([MLX_DSV4, "chat", "--model", str(tiny_chat_dir()), "--max-tokens", "3"],
                         input=b"Hello there\nh\xffi\nAnd again\n/quit\n", capture_output=True, env=env, timeout=120)
    out = run.stdout.decode("utf-8", errors="replace")
    assert run.returncode == 0, run.stderr.decode()
    assert "error: the message is not UTF-8 text (character 1 comes from a byte that is not UTF-8)" in out
    (new, cached, generated, _), (_, cached_next, _, _) = TURN_STATS.findall(out)
    assert cached == "0" and int(cached_next) == int(new) + int(generated)


@pytest.mark.parametrize("system,message", [
    ("a \ufdd0 b", "--system: message 0, field 'content': contains U+FDD0 or U+FDD1, Unicode noncharacters"),
    ("a\udcffb", "--system: not UTF-8 text (character 1 comes from a byte that is not UTF-8)"),
])
def test_a_bad_system_prompt_is_refused_before_loading(tmp_path, capsys, system, message):
    from mlx_dsv4.cli import main

    code = main(["chat", "--model", str(config_only_dir(tmp_path)), "--system", system])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def chat_output(tmp_path, name, *flags):
    """stdout of a chat session of two turns (a fresh prompt-cache folder of its own)."""
    import signal

    env = dict(os.environ, HOME=str(tmp_path / name), XDG_CACHE_HOME=str(tmp_path / name / "cache"))
    proc = subprocess.Popen([MLX_DSV4, "chat", "--model", str(tiny_chat_dir()), "--max-tokens", "10", *flags],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(b"Hello there\nAnd again\n/quit\n", timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err.decode()
    return out.decode()


def test_draft_mtp_chat_gives_the_plain_replies_and_resumes_from_the_prompt_cache(tmp_path):
    summary = re.compile(r"\[(\d+) new prompt tokens prefilled, (\d+) cached \| (\d+) tokens at [^\]]*\]\n")
    plain = chat_output(tmp_path, "plain")
    drafted = chat_output(tmp_path, "drafted", "--draft", "mtp", "--num-draft", "2")
    assert summary.sub("", drafted) == summary.sub("", plain)
    turns = summary.findall(drafted)
    assert len(turns) == 2 and int(turns[1][1]) == int(turns[0][0]) + int(turns[0][2])
    figures = re.findall(r" \| draft (\d+)/(\d+) accepted", drafted)
    assert len(figures) == 2 and all(0 <= int(a) <= int(p) and int(p) > 0 for a, p in figures)
    assert "accepted" not in plain


@pytest.mark.parametrize("flags, message", [
    (["--draft", "mtp", "--num-draft", "0"], "error: --num-draft must be an integer in 1..8, got 0\n"),
    (["--draft", "mtp", "--num-draft", "9"], "error: --num-draft must be an integer in 1..8, got 9\n"),
    (["--draft", "mtp", "--repetition-penalty", "1.2"],
     "error: --draft 'mtp' runs no logits processors (--repetition-penalty)\n"),
])
def test_bad_draft_flags_are_refused_before_loading(tmp_path, capsys, flags, message):
    from mlx_dsv4.cli import main

    code = main(["chat", "--model", str(config_only_dir(tmp_path)), *flags])
    assert code == 2
    assert capsys.readouterr().err == message


def test_draft_mtp_names_a_checkpoint_without_an_mtp_layer(tmp_path, capsys):
    from generate_support import LAYERS
    from mlx_dsv4.cli import main
    from mlx_dsv4.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "no-mtp", mtp=False, compress_ratios=LAYERS, num_hash_layers=1)
    code = main(["chat", "--model", str(path), "--draft", "mtp", "--prompt-cache-dir", "none"])
    assert code == 1
    assert f"error: {path}: --draft 'mtp' needs an MTP layer (mtp.* tensors)" in capsys.readouterr().err
