"""`mlx-dsv4 generate` on the tiny random checkpoint: in-process, and on a terminal with pexpect."""

import json
import re
import sys
from pathlib import Path

import pytest

from generate_support import tiny_chat_dir, tiny_chat_model
from mlx_dsv4.chat import encode_messages, parse_completion
from mlx_dsv4.cli import main
from mlx_dsv4.generate import generate

MLX_DSV4 = str(Path(sys.executable).with_name("mlx-dsv4"))


@pytest.fixture(scope="module")
def model_dir():
    return str(tiny_chat_dir())


def run_cli(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def api_reply(messages, max_tokens, **chat_options):
    model, tok = tiny_chat_model()
    text = encode_messages(messages, **chat_options)
    result = generate(model, tok, text, max_tokens=max_tokens)
    return result, len(tok.encode(text))


def test_json_prints_the_parsed_message(capsys, model_dir):
    code, out, _ = run_cli(capsys, "--model", model_dir, "--prompt", "Name a bird.", "--system", "Be brief.",
                           "--max-tokens", "10", "--json")
    assert code == 0
    message = json.loads(out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a bird."}]
    result, n_prompt = api_reply(messages, 10)
    expected = parse_completion(result.text, "chat", strict=False)
    assert message["content"] == expected["content"]
    assert message["reasoning_content"] is None
    assert message["tool_calls"] == expected["tool_calls"]
    assert message["finish_reason"] == "length"
    assert message["usage"]["prompt_tokens"] == n_prompt
    assert message["usage"]["completion_tokens"] == 10


def test_think_max_encodes_reasoning_effort(capsys, model_dir):
    code, out, _ = run_cli(capsys, "--model", model_dir, "--prompt", "Why is the sky blue?",
                           "--thinking", "think-max", "--max-tokens", "8", "--json")
    assert code == 0
    message = json.loads(out)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    result, n_prompt = api_reply(messages, 8, thinking_mode="thinking", reasoning_effort="max")
    assert message["usage"]["prompt_tokens"] == n_prompt
    assert message["reasoning_content"] == parse_completion(result.text, "thinking", strict=False)["reasoning_content"]


def test_plain_output_is_the_answer_alone(capsys, model_dir):
    code, out, err = run_cli(capsys, "--model", model_dir, "--prompt", "Name a bird.", "--max-tokens", "10")
    assert code == 0
    result, n_prompt = api_reply([{"role": "user", "content": "Name a bird."}], 10)
    assert out == parse_completion(result.text, "chat", strict=False)["content"] + "\n"
    assert "\x1b" not in out and "\x1b" not in err
    assert re.search(rf"prompt {n_prompt} tokens \({n_prompt} prefilled, 0 cached\)", err)
    assert "generated 10 tokens" in err


def test_reasoning_goes_to_stderr_when_stdout_is_not_a_terminal(capsys, model_dir):
    code, out, err = run_cli(capsys, "--model", model_dir, "--prompt", "Why?", "--thinking", "think",
                             "--max-tokens", "10")
    assert code == 0
    result, _ = api_reply([{"role": "user", "content": "Why?"}], 10, thinking_mode="thinking")
    parsed = parse_completion(result.text, "thinking", strict=False)
    assert parsed["reasoning_content"].strip()
    assert parsed["reasoning_content"].strip() in err
    assert out == (parsed["content"] + "\n" if parsed["content"] else "")


def test_prompt_cache_file_is_reused_and_checked(capsys, model_dir, tmp_path):
    cache = str(tmp_path / "system.cache")
    system = "You answer questions about birds, briefly and precisely. " * 10
    common = ["--model", model_dir, "--system", system, "--max-tokens", "6"]
    code, _, err = run_cli(capsys, *common, "--prompt", "Name a heron.", "--prompt-cache", cache)
    assert code == 0 and "saved prompt cache" in err and Path(cache).is_file()

    code, cached_out, err = run_cli(capsys, *common, "--prompt", "Name a gull.", "--prompt-cache", cache)
    assert code == 0
    _, tok = tiny_chat_model()
    n_system = len(tok.encode(encode_messages([{"role": "system", "content": system}], add_generation_prompt=False)))
    assert re.search(rf"\(\d+ prefilled, {n_system} cached\)", err)
    code, fresh_out, _ = run_cli(capsys, *common, "--prompt", "Name a gull.")
    assert cached_out == fresh_out

    code, _, err = run_cli(capsys, "--model", model_dir, "--system", "Something else.", "--max-tokens", "2",
                           "--prompt", "Name a gull.", "--prompt-cache", cache)
    assert code == 1
    assert "does not extend the cached prefix" in err


def test_max_kv_size_refuses_with_tokens_that_fit(capsys, model_dir):
    code, out, err = run_cli(capsys, "--model", model_dir, "--prompt", "Hi", "--max-tokens", "100000",
                             "--max-kv-size", "300KB")
    assert code == 1
    assert re.search(r"error: the KV cache .* \d+ tokens fit", err)
    assert out == ""


def test_bad_model_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--model", str(tmp_path), "--prompt", "Hi")
    assert code == 1 and err.startswith("error:")


def test_terminal_output_dims_reasoning_shows_progress_and_stops_on_ctrl_c(model_dir):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        MLX_DSV4,
        ["generate", "--model", model_dir, "--prompt", "Tell me everything. " * 10, "--thinking", "think",
         "--max-tokens", "100000", "--prefill-step", "8"],
        encoding="utf-8", timeout=60, dimensions=(24, 200),
    )
    child.expect(r"prefill \[#*\.*\] \d+/\d+ tokens")
    child.expect_exact("\x1b[2m")  # reasoning starts dimmed
    child.expect(r"\S{8}")  # some reasoning text has streamed
    child.sendintr()
    child.expect(r"finish: interrupted")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
