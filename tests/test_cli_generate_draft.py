"""`mlx-dsv4 generate --draft mtp --num-draft N`: plain greedy output, acceptance figures in --json."""

import json

import pytest

from generate_support import LAYERS, tiny_chat_dir
from mlx_dsv4.cli import main


def run_cli(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_draft_mtp_prints_the_plain_answer_and_acceptance(capsys):
    common = ["--model", str(tiny_chat_dir()), "--prompt", "Name a bird.", "--max-tokens", "12", "--json"]
    code, plain, _ = run_cli(capsys, *common)
    assert code == 0
    code, drafted, _ = run_cli(capsys, *common, "--draft", "mtp", "--num-draft", "2")
    assert code == 0
    plain, drafted = json.loads(plain), json.loads(drafted)
    draft = drafted.pop("draft")
    for reply in (plain, drafted):
        reply["usage"] = {k: v for k, v in reply["usage"].items() if k.endswith("tokens")}
    assert drafted == plain
    assert draft["drafter"] == "mtp" and draft["num_draft"] == 2
    assert 0 <= draft["accepted"] <= draft["proposed"] and draft["proposed"] > 0
    assert draft["acceptance_rate"] == round(draft["accepted"] / draft["proposed"], 4)
    assert "draft" not in plain


@pytest.mark.parametrize("flags, message", [
    (["--draft", "mtp", "--num-draft", "0"], "error: --num-draft must be an integer in 1..8, got 0"),
    (["--draft", "mtp", "--num-draft", "9"], "error: --num-draft must be an integer in 1..8, got 9"),
    (["--draft", "mtp", "--repetition-penalty", "1.1"], "error: --draft 'mtp' runs no logits processors"),
])
def test_bad_draft_flags_are_named(capsys, flags, message):
    code, _, err = run_cli(capsys, "--model", str(tiny_chat_dir()), "--prompt", "Hi", *flags)
    assert code == 2
    assert message in err


def test_draft_mtp_names_a_checkpoint_without_mtp_layer(capsys, tmp_path):
    from mlx_dsv4.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "no-mtp", mtp=False, compress_ratios=LAYERS, num_hash_layers=1)
    code, _, err = run_cli(capsys, "--model", str(path), "--prompt", "Hi", "--draft", "mtp")
    assert code == 1
    assert f"error: {path}: --draft 'mtp' needs an MTP layer (mtp.* tensors)" in err


def test_draft_mtp_samples_with_the_temperature(capsys):
    import json

    code, out, err = run_cli(capsys, "--model", str(tiny_chat_dir()), "--prompt", "Hi", "--max-tokens", "9",
                             "--temp", "0.7", "--top-k", "5", "--seed", "2", "--draft", "mtp", "--json")
    assert code == 0, err
    draft = json.loads(out)["draft"]
    assert draft["drafter"] == "mtp" and draft["proposed"] > 0


def test_draft_mtp_with_a_prompt_cache_file(capsys, tmp_path):
    """The file a drafted run writes keeps the drafter's state: the same prompt again restores it
    and gives the plain answer; so does a plain run from that file."""
    cache = tmp_path / "prompt.safetensors"
    common = ["--model", str(tiny_chat_dir()), "--prompt", "Name a bird.", "--max-tokens", "10", "--json"]
    code, plain, _ = run_cli(capsys, *common)
    assert code == 0
    plain = json.loads(plain)
    replies = []
    for flags in (["--draft", "mtp"], ["--draft", "mtp"], []):
        code, out, err = run_cli(capsys, *common, "--prompt-cache", str(cache), *flags)
        assert code == 0, err
        replies.append(json.loads(out))
    assert [r["content"] for r in replies] == [plain["content"]] * 3
    n = plain["usage"]["prompt_tokens"]
    assert [r["usage"]["cached_tokens"] for r in replies] == [0, n - 1, n - 1]
    assert replies[1]["draft"]["proposed"] > 0


def test_the_flags_offer_every_drafter():
    from mlx_dsv4.cli.common import DRAFTERS as FLAG_CHOICES
    from mlx_dsv4.generate import DRAFTERS

    assert FLAG_CHOICES == DRAFTERS
