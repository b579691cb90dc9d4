"""mlx-lm opens a checkpoint written with mlx-lm support (``make-tiny --mlx-lm``; the converter
always): its chat template, its model file, its caches, and mlx-lm's own command-line tools run
as subprocesses against it."""

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_dsv4.chat import encode_messages
from mlx_dsv4.mlx_lm_files import CHAT_TEMPLATE_FILE, MODEL_FILE
from test_server_support import ServerProcess, free_port

FIXTURES = Path(__file__).parent / "fixtures" / "chat"
GOLDEN = sorted(p.stem for p in FIXTURES.glob("*.json"))
PROMPT = "Hello there"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mlx_dsv4.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("mlxlm") / "tiny", dtype="bfloat16", mlx_lm=True)


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(checkpoint))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """(mlx-lm's model and tokenizer, ours) for the checkpoint."""
    from mlx_lm import load as mlx_lm_load

    from mlx_dsv4 import load

    return mlx_lm_load(str(checkpoint), trust_remote_code=True), load(checkpoint)


def _hf_messages(messages):
    """OpenAI messages as chat templates take them: tool-call arguments as objects (mlx-lm's server
    parses the JSON text the same way before it renders)."""
    messages = copy.deepcopy(messages)
    for message in messages:
        for call in message.get("tool_calls") or []:
            if isinstance(call["function"].get("arguments"), str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return messages


def run_mlx_lm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mlx_lm", *args], capture_output=True, text=True, timeout=timeout)


# -- the chat template ------------------------------------------------------------------


def test_checkpoint_names_its_model_file(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_file"] == MODEL_FILE
    assert (checkpoint / MODEL_FILE).is_file() and (checkpoint / CHAT_TEMPLATE_FILE).is_file()
    assert "@" not in (checkpoint / CHAT_TEMPLATE_FILE).read_text().split("-#}", 1)[1]


@pytest.mark.parametrize("name", GOLDEN)
def test_chat_template_renders_golden_prompts(hf_tokenizer, name):
    case = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    expected = (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")[:-1]  # the file closes with a newline
    options = dict(case["options"])
    add_generation_prompt = options.pop("add_generation_prompt", True)
    rendered = hf_tokenizer.apply_chat_template(_hf_messages(case["messages"]), tokenize=False,
                                                add_generation_prompt=add_generation_prompt, **options)
    assert rendered == expected == encode_messages(case["messages"], **case["options"])


TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]
CONVERSATIONS = {
    "first turn": [{"role": "user", "content": "2+3?"}],
    "with system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}],
    "tool loop": [{"role": "user", "content": "2+3?"},
                  {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
                   "tool_calls": [{"id": "c1", "type": "function",
                                   "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}},
                                  {"id": "c2", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c2", "content": "0"},
                  {"role": "tool", "tool_call_id": "c1", "content": "5"}],
}


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools argument"])
@pytest.mark.parametrize("options", [{}, {"thinking_mode": "thinking"}, {"enable_thinking": True},
                                     {"thinking_mode": "thinking", "reasoning_effort": "max"},
                                     {"thinking_mode": "chat", "add_generation_prompt": False}],
                         ids=["default", "thinking", "enable_thinking", "effort max", "no generation prompt"])
def test_chat_template_matches_encoder_with_tools_argument(hf_tokenizer, conversation, tools, options):
    """Tools passed as apply_chat_template's ``tools`` (as mlx-lm's server does) and mlx-lm's
    ``enable_thinking`` switch, against ``encode_messages``."""
    messages = CONVERSATIONS[conversation]
    options = dict(options)
    add_generation_prompt = options.pop("add_generation_prompt", True)
    ours = dict(options, add_generation_prompt=add_generation_prompt)
    if ours.pop("enable_thinking", False):
        ours["thinking_mode"] = "thinking"
    expected = encode_messages(messages, tools=tools, **ours)
    rendered = hf_tokenizer.apply_chat_template(_hf_messages(messages), tools=tools, tokenize=False,
                                                add_generation_prompt=add_generation_prompt, **options)
    assert rendered == expected


def test_chat_template_refuses_arguments_given_as_json_text(hf_tokenizer):
    """The template cannot parse JSON; it does not validate conversations either (encode_messages
    reports bad ones with the message index and field)."""
    messages = CONVERSATIONS["tool loop"]
    with pytest.raises(Exception, match="arguments must be an object"):
        hf_tokenizer.apply_chat_template(messages, tokenize=False)


# -- the model and its caches in mlx-lm's protocol ---------------------------------------


def test_mlx_lm_load_gives_the_same_logits(loaded):
    (model, tokenizer), (ours, our_tokenizer) = loaded
    ids = our_tokenizer.encode(encode_messages([{"role": "user", "content": PROMPT}]))
    assert tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            enable_thinking=False) == ids
    logits = model(mx.array([ids]), cache=model.make_cache())
    assert logits.shape == (1, len(ids), ours.args.vocab_size)
    assert mx.array_equal(logits, ours(mx.array([ids])))


def test_cache_objects_follow_mlx_lm_protocol(loaded):
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    (model, _), _ = loaded
    cache = make_prompt_cache(model)
    assert len(cache) == len(model.layers) and all(c.offset == 0 and c.empty() for c in cache)
    model(mx.array([[0, 5, 6, 7]]), cache=cache)
    assert [c.offset for c in cache] == [4] * len(cache) and not any(c.empty() for c in cache)
    assert all(c.nbytes > 0 for c in cache)
    # exact trimming is impossible (pooled entries) and there is no batch merge: mlx-lm's server
    # then reuses only exact prefixes and serves requests one after another
    assert not can_trim_prompt_cache(cache) and not any(hasattr(c, "merge") for c in cache)
    with pytest.raises(ValueError, match="DeepseekV4LayerCache"):
        model(mx.array([[1]]), cache=cache[:-1])


def test_copied_and_saved_caches_continue_exactly(loaded, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    (model, _), _ = loaded
    prompt, more = mx.array([list(range(3, 140))]), mx.array([[7, 8, 9]])
    cache = model.make_cache()
    model(prompt, cache=cache)
    copied = copy.deepcopy(cache)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache, {"model": "tiny"})
    expected = model(more, cache=cache)
    assert mx.array_equal(model(more, cache=copied), expected)
    restored = load_prompt_cache(path)
    assert [c.offset for c in restored] == [prompt.shape[1]] * len(restored)
    assert mx.array_equal(model(more, cache=restored), expected)


# -- mlx-lm's command-line tools --------------------------------------------------------


def _generated_text(stdout):
    """The text mlx_lm generate prints between its two ========== lines."""
    start = stdout.index("==========\n") + len("==========\n")
    return stdout[start: stdout.index("\n==========\n", start)]


def test_mlx_lm_generate_matches_mlx_dsv4_generate(checkpoint, loaded):
    from mlx_dsv4.generate import generate

    _, (ours_model, our_tokenizer) = loaded
    ids = our_tokenizer.encode(encode_messages([{"role": "user", "content": PROMPT}]))
    raw = generate(ours_model, our_tokenizer, ids, max_tokens=12, temperature=0.0).text
    ours = subprocess.run([sys.executable, "-m", "mlx_dsv4.cli", "generate", "--model", str(checkpoint),
                           "--prompt", PROMPT, "--temp", "0", "--max-tokens", "12", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    theirs = run_mlx_lm("generate", "--model", str(checkpoint), "--trust-remote-code", "--temp", "0",
                        "--prompt", PROMPT, "--max-tokens", "12", "--chat-template-config",
                        '{"enable_thinking": false}')
    assert theirs.returncode == 0, theirs.stderr
    assert "Generation: 12 tokens" in theirs.stdout
    text = _generated_text(theirs.stdout)
    assert text == raw
    # the CLI prints the parsed reply, whose content loses trailing whitespace
    assert text.rstrip() == json.loads(ours.stdout)["content"] and text.strip()


def test_mlx_lm_prompt_cache_file_needs_the_model_loaded_first(checkpoint, loaded, tmp_path):
    """``mlx_lm generate --prompt-cache-file`` reads the file before it loads the model file, so
    mlx-lm cannot find the cache class yet and stops, naming it."""
    from mlx_lm.models.cache import save_prompt_cache

    (model, _), _ = loaded
    cache = model.make_cache()
    model(mx.array([[0, 128803, 19923]]), cache=cache)
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(str(path), cache, {"model": str(checkpoint), "tokenizer_config": "{}"})
    result = run_mlx_lm("generate", "--trust-remote-code", "--prompt-cache-file", str(path), "--prompt", "x",
                        "--max-tokens", "2")
    assert result.returncode != 0 and "KeyError: 'DeepseekV4LayerCache'" in result.stderr


class _MlxLmServer(ServerProcess):
    """``mlx_lm server`` in a subprocess, on a free loopback port."""

    def __init__(self, checkpoint, log_path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", str(checkpoint), "--trust-remote-code",
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
        self._wait_ready(timeout=120)


def test_mlx_lm_server_answers_the_openai_client(checkpoint, loaded, tmp_path):
    openai = pytest.importorskip("openai")
    from mlx_dsv4.generate import generate

    _, (ours, our_tokenizer) = loaded
    server = _MlxLmServer(checkpoint, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", timeout=60)
        prompts = ["Hello there", "What is 2+3?", "Name a colour."]

        def ask(prompt):
            reply = client.chat.completions.create(
                model=str(checkpoint), messages=[{"role": "user", "content": prompt}], temperature=0,
                max_tokens=8, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
            return reply.choices[0].message.content

        def expected(prompt):
            ids = our_tokenizer.encode(encode_messages([{"role": "user", "content": prompt}]))
            # mlx-lm's server drops whitespace at the start of a reply
            return generate(ours, our_tokenizer, ids, max_tokens=8, temperature=0.0).text.lstrip()

        plain = ask(prompts[0])
        assert plain == expected(prompts[0])
        stream = client.chat.completions.create(
            model=str(checkpoint), messages=[{"role": "user", "content": prompts[0]}], temperature=0,
            max_tokens=8, stream=True, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == plain

        # concurrent requests: mlx-lm batches only caches with `merge`; each answer must be its own
        answers = {}
        threads = [threading.Thread(target=lambda p=p: answers.__setitem__(p, ask(p))) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert answers == {p: expected(p) for p in prompts}
    finally:
        server.stop()


def test_converted_quantised_checkpoint_loads_in_mlx_lm(checkpoint, tmp_path):
    from mlx_lm import load as mlx_lm_load

    from mlx_dsv4 import load
    from mlx_dsv4.cli import main

    out = tmp_path / "q4"
    assert main(["convert", "--hf-path", str(checkpoint), "--mlx-path", str(out), "--recipe", "q4", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["model_file"] == MODEL_FILE
    assert (out / CHAT_TEMPLATE_FILE).read_text() == (checkpoint / CHAT_TEMPLATE_FILE).read_text()
    model, _ = mlx_lm_load(str(out), trust_remote_code=True)
    ours, _ = load(out)
    ids = mx.array([[0, 128803, 19923, 1031, 128804, 128822]])
    assert mx.array_equal(model(ids, cache=model.make_cache()), ours(ids))
