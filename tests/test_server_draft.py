"""`mlx-dsv4 serve --draft mtp`: served greedy output as without a draft, acceptance in each
response's usage, in /health and in /metrics; bad draft flags refused at start."""

import tempfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from generate_support import LAYERS
from mlx_dsv4.cli import main
from mlx_dsv4.metrics import figures_from_prometheus
from test_server_support import ServerProcess, checkpoint_dir, free_port

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

MODEL = "tiny-v4"
PROMPTS = ["Name a bird.", "Count to five", "What is the capital of France?"]


@contextmanager
def served(tmp_path, *flags):
    """A server on the tiny checkpoint (it has an MTP layer), greedy by default, with its own
    prompt caches, stopped whatever happens."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    server = ServerProcess(["--served-model-name", MODEL, "--temperature", "0", *flags], root=root)
    try:
        yield server.base
    finally:
        server.stop()
        server.log.close()


def conversation(base):
    """Greedy replies of both APIs and endpoints, streamed and not, and a second turn that reuses
    the first's prompt cache: (texts, usages of the responses that carry one)."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    texts, usages = [], []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=14, temperature=0)
        texts.append(reply.choices[0].message.content)
        usages.append(reply.usage)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
        again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=14, temperature=0)
        texts.append(again.choices[0].message.content)
        usages.append(again.usage)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=14, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    usages.append(chunks[-1].usage)
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=14, temperature=0)
    texts.append(completion.choices[0].text)
    usages.append(completion.usage)
    claude = anthropic.Anthropic(base_url=base, api_key="none", max_retries=0, timeout=120)
    message = claude.messages.create(model=MODEL, max_tokens=14,
                                     messages=[{"role": "user", "content": PROMPTS[1]}])
    texts.append(message.content[0].text if message.content else "")
    usages.append(message.usage)
    return texts, usages


def speculative(usage) -> dict:
    return (usage.model_extra or {}).get("speculative")


def test_drafted_serving_gives_the_plain_greedy_output_and_reports_acceptance(tmp_path):
    with served(tmp_path) as base:
        plain_texts, plain_usages = conversation(base)
        health = httpx.get(base + "/health").json()
    assert health["draft"] is None
    assert all(speculative(u) is None for u in plain_usages)

    with served(tmp_path, "--draft", "mtp", "--num-draft", "3") as base:
        before = httpx.get(base + "/health").json()["draft"]
        texts, usages = conversation(base)
        health = httpx.get(base + "/health").json()
        metrics = figures_from_prometheus(httpx.get(base + "/metrics").text)
    assert texts == plain_texts
    assert before == {"drafter": "mtp", "num_draft": 3, "proposed": 0, "accepted": 0, "acceptance_rate": None}
    figures = [speculative(u) for u in usages]
    assert all(set(f) == {"proposed", "accepted"} and 0 <= f["accepted"] <= f["proposed"] for f in figures)
    assert all(f["proposed"] > 0 for f in figures)
    # the second turns restored the first turns' snapshots, the drafter's state with them
    assert all(u.prompt_tokens_details.cached_tokens > 0 for u in usages[1:6:2])
    draft = health["draft"]
    proposed, accepted = sum(f["proposed"] for f in figures), sum(f["accepted"] for f in figures)
    assert (draft["drafter"], draft["num_draft"], draft["proposed"], draft["accepted"]) == ("mtp", 3, proposed,
                                                                                             accepted)
    assert 0 <= draft["acceptance_rate"] <= 1 and draft["acceptance_rate"] == round(accepted / proposed, 4)
    assert health["batch"]["max"] == 1
    assert metrics["draft"] == {"proposed": proposed, "accepted": accepted,
                                "acceptance_rate": round(accepted / proposed, 4)}


def serve_errors(capsys, *flags, model=None):
    code = main(["serve", "--model", str(model or checkpoint_dir()), "--port", str(free_port()), *flags])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--draft", "mtp", "--num-draft", "0"], "error: --num-draft must be an integer in 1..8, got 0"),
    (["--draft", "mtp", "--num-draft", "9"], "error: --num-draft must be an integer in 1..8, got 9"),
    (["--draft", "mtp", "--repetition-penalty", "1.1"], "error: --draft 'mtp' runs no logits processors "
                                                        "(--repetition-penalty)"),
    (["--draft", "mtp", "--max-batch", "4"], "error: --draft decodes one request at a time: it does not run "
                                             "with --max-batch 4"),
])
def test_bad_draft_flags_are_refused_before_loading(capsys, flags, message):
    code, err = serve_errors(capsys, *flags)
    assert code == 2
    assert message in err


def test_a_checkpoint_without_an_mtp_layer_is_named(capsys, tmp_path):
    from mlx_dsv4.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "no-mtp", mtp=False, compress_ratios=LAYERS, num_hash_layers=1)
    code, err = serve_errors(capsys, "--draft", "mtp", "--prompt-cache-dir", "none", model=path)
    assert code == 1
    assert f"error: {path}: --draft 'mtp' needs an MTP layer (mtp.* tensors)" in err
