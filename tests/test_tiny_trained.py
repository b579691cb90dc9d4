"""The tiny V4 shipped in the package: it is what the trainer writes (config, tokenizer, the runs
that made it), it fits in the package, and a slice of the evaluation that a broken or untrained
model fails runs in seconds."""

import json

import pytest

from mlx_dsv4 import load
from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train import evaluate, trained_checkpoint
from mlx_dsv4.train.ship import SHIP_EMBED_BITS, training_stages
from mlx_dsv4.train.trainer import TrainOptions, trained_config
from train_runs_support import fake_run

SHIPPED = trained_checkpoint()


@pytest.fixture(scope="module")
def stages():
    return json.loads((SHIPPED / "training.json").read_text())


@pytest.fixture(scope="module")
def trained():
    model, tokenizer = load(SHIPPED, mtp=True)
    return evaluate.float32_copy(model), tokenizer


def test_the_shipped_config_is_the_trainers_for_its_last_run(stages):
    last = stages[-1]
    options = TrainOptions(**{k: v for k, v in last.items() if k in vars(TrainOptions())})
    want = trained_config(options.preset, **(options.config or {}))
    got = json.loads((SHIPPED / "config.json").read_text())
    assert {k: got.get(k) for k in want if k != "tie_word_embeddings"} == {
        k: v for k, v in want.items() if k != "tie_word_embeddings"}
    assert got["tie_word_embeddings"] is True
    assert got["quantization"]["embed"]["bits"] == SHIP_EMBED_BITS


def test_the_shipped_tokenizer_is_the_trainers():
    shipped, trainer = load_tokenizer(SHIPPED), load_tokenizer()
    assert shipped.tokenizer.get_vocab(with_added_tokens=True) == trainer.tokenizer.get_vocab(with_added_tokens=True)
    config = json.loads((SHIPPED / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (shipped.bos_token_id, shipped.eos_token_id)
    assert config["vocab_size"] >= shipped.vocab_size


def test_the_checkpoint_fits_in_the_package():
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 15 * 2 ** 20


def test_training_json_chains_its_runs_from_scratch(stages):
    assert stages[0]["init_from"] is None
    for before, after in zip(stages, stages[1:]):
        assert after["init_from"] == before["run"]
    assert all(0 < s["stopped_at_step"] <= s["steps"] for s in stages)


def test_training_stages_follow_init_from_to_the_first_run(tmp_path):
    fake_run(tmp_path, "first", None, 100)
    fake_run(tmp_path, "snapshot", "first", 600, stopped=250)
    fake_run(tmp_path, "last", "snapshot", 40, stopped=40)
    stages = training_stages(tmp_path / "last")
    assert [(s["run"], s["init_from"], s["stopped_at_step"]) for s in stages] == [
        ("first", None, 100), ("snapshot", "first", 250), ("last", "snapshot", 40)]


def test_eval_slice(trained):
    """Bounds an untrained model fails: it calls no tool, reads no key and drafts at chance."""
    model, tokenizer = trained
    tool = evaluate.tool_use(model, tokenizer, n=4, unseen_cities=False)
    assert tool["right_tool"] == 1.0 and tool["correct"] >= 0.5, tool["failures"]
    assert evaluate.retrieval(model, tokenizer, 1024, n=3)["accuracy"] >= 2 / 3
    assert evaluate.mtp_acceptance(model, tokenizer, n=2, new_tokens=12)["acceptance"] >= 0.3
    fp8 = evaluate.cache_precision(model, tokenizer, n=1, prefix_tokens=512)[0]
    assert fp8["storage"] == "fp8/fp4" and fp8["argmax_agreement"] >= 0.8
