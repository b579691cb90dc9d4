"""`mlx-dsv4 generate` on the tiny random checkpoint: in-process, and on a terminal with pexpect."""

import io
import json
import re
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from generate_support import BAD_SAMPLING_FLAGS, config_only_dir, default_sigint, tiny_chat_dir, tiny_chat_model
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
        encoding="utf-8", preexec_fn=default_sigint, timeout=60, dimensions=(24, 200),
    )
    child.expect(r"prefill \[#*\.*\] \d+/\d+ tokens")
    child.expect_exact("\x1b[2m")  # reasoning starts dimmed
    child.expect(r"\S{8}")  # some reasoning text has streamed
    child.sendintr()
    child.expect(r"finish: interrupted")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130


def test_prompt_cache_into_a_missing_folder_prints_the_answer_then_the_error(capsys, model_dir, tmp_path):
    cache = tmp_path / "missing" / "system.cache"
    code, out, err = run_cli(capsys, "--model", model_dir, "--prompt", "Name a bird.", "--max-tokens", "10",
                             "--prompt-cache", str(cache))
    assert code == 1
    result, _ = api_reply([{"role": "user", "content": "Name a bird."}], 10)
    assert out == parse_completion(result.text, "chat", strict=False)["content"] + "\n"
    assert "generated 10 tokens" in err
    assert err.endswith(f"error: --prompt-cache: {cache}: cannot write the prompt cache: "
                        f"the folder {cache.parent} does not exist\n")
    assert not cache.parent.exists()


def test_a_damaged_prompt_cache_file_is_refused_before_generating(capsys, model_dir, tmp_path):
    cache = tmp_path / "system.cache"
    code, _, _ = run_cli(capsys, "--model", model_dir, "--prompt", "Name a heron.", "--max-tokens", "2",
                         "--prompt-cache", str(cache))
    assert code == 0
    data = bytearray(cache.read_bytes())
    data[-1000] ^= 0x01
    cache.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "--model", model_dir, "--prompt", "Name a gull.", "--max-tokens", "2",
                             "--prompt-cache", str(cache))
    assert (code, out) == (1, "")
    assert err == f"error: {cache}: the arrays do not match the checksum in the header: the file is damaged\n"


@pytest.mark.parametrize("flags,message", BAD_SAMPLING_FLAGS)
def test_bad_sampling_flags_are_refused_before_loading(capsys, tmp_path, flags, message):
    code, out, err = run_cli(capsys, "--model", str(config_only_dir(tmp_path)), "--prompt", "Hi", *flags)
    assert (code, out) == (2, "")
    assert re.fullmatch(f"error: {message}\n", err)


def test_bad_sampling_flags_are_refused_with_a_model(capsys, model_dir):
    code, out, err = run_cli(capsys, "--model", model_dir, "--prompt", "Hi", "--top-k", "129280")
    assert (code, out) == (2, "")
    assert err.startswith("error: --top-k must be an integer in [0, 129280)")
    code, _, _ = run_cli(capsys, "--model", model_dir, "--prompt", "Hi", "--top-k", "129279", "--max-tokens", "1")
    assert code == 0


def test_prefill_step_must_be_positive(capsys, model_dir):
    with pytest.raises(SystemExit) as caught:
        main(["generate", "--model", model_dir, "--prompt", "Hi", "--prefill-step", "0"])
    assert caught.value.code == 2
    assert "argument --prefill-step: expected a positive integer, got 0" in capsys.readouterr().err


def test_prompt_and_system_that_are_not_utf8_are_refused(capsys, model_dir, monkeypatch):
    undecodable = "a\udcffb"  # how Python passes on an argument byte that is not UTF-8
    for flags, name in [(["--prompt", undecodable], "--prompt"), (["--prompt", "Hi", "--system", undecodable],
                                                                   "--system")]:
        code, out, err = run_cli(capsys, "--model", model_dir, *flags)
        assert (code, out) == (2, "")
        assert err == f"error: {name}: not UTF-8 text (character 1 comes from a byte that is not UTF-8)\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(undecodable))
    code, out, err = run_cli(capsys, "--model", model_dir, "--prompt", "-")
    assert (code, out) == (2, "")
    assert err.startswith("error: --prompt -: standard input: not UTF-8 text (character 1")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\xffb"), encoding="utf-8", errors="strict"))
    code, out, err = run_cli(capsys, "--model", model_dir, "--prompt", "-")
    assert (code, out, err) == (2, "", "error: --prompt -: standard input is not UTF-8 text\n")


@pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="names the CPU's paths")
def test_verbose_names_the_device_and_the_kernel_paths(capsys, model_dir, monkeypatch):
    argv = ("--model", model_dir, "--prompt", "Hi", "--max-tokens", "2")
    code, _, quiet = run_cli(capsys, *argv)
    assert code == 0 and "attention decode" not in quiet
    code, _, err = run_cli(capsys, *argv, "--verbose")
    assert code == 0
    assert err.splitlines()[:5] == [
        "device: cpu (cpu paths)",
        "attention decode: matmul",
        "expert matmul: gather_mm (float32 weights)",
        "indexer scores: quantized_matmul",
        "streams: default stream",
    ]
    monkeypatch.setenv("MLX_DSV4_FORCE_PATHS", "accelerator")
    monkeypatch.setenv("MLX_DSV4_CPU_STREAMS", "2")
    code, _, err = run_cli(capsys, *argv, "--verbose")
    assert code == 0
    assert err.splitlines()[:2] == ["device: cpu (accelerator paths)", "attention decode: sdpa"]
    assert "streams: default stream" in err.splitlines()
