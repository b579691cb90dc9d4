"""Data-parallel training (`train-tiny --processes N`): N local ranks, each drawing its own
sequences, take the step that the average of their gradients gives."""

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_dsv4.cli import main
from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train.recipe import RecipeError, load_recipe
from mlx_dsv4.train.data import KINDS
from mlx_dsv4.train.trainer import Trainer, TrainOptions, sequence_losses

FLAGS = ["--steps", "2", "--seed", "5", "--max-tokens", "256", "--mix", "copy=1,name=1", "--head-sample", "64",
         "--config", "o_lora_rank=64", "--guide-weight", "1", "--copy-value-weight", "1"]


def _options(**extra):
    return TrainOptions(steps=2, seed=5, max_tokens=256, mix={"copy": 1.0, "name": 1.0}, head_sample=64,
                        config={"o_lora_rank": 64}, guide_weight=1.0, copy_value_weight=1.0, **extra)


def _gradients(trainer):
    batch, _ = trainer.batch()
    (loss, parts), grads = trainer._grad(
        trainer._joint, batch["tokens"], batch["main_pos"], batch["main_targets"], batch["mtp_pos"],
        batch["mtp_targets"], batch["index_pos"], batch["copy_queries"], batch["copy_masks"], batch["value_pos"],
        batch["entry_query"], batch["key_pos"], batch["entry_keys"], batch["arguments"], batch["vocab"])
    return loss, grads, batch["tokens"], float(parts["main"])


def test_two_processes_take_the_step_of_their_averaged_gradients(tmp_path):
    out = tmp_path / "dp"
    assert main(["train-tiny", str(out), *FLAGS, "--processes", "2"]) == 0
    logged = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert json.loads((out / "train_options.json").read_text())["processes"] == 2

    # the same two steps in this process: a trainer per rank, gradients averaged by hand
    tokenizer = load_tokenizer(None)
    ranks = [Trainer(tokenizer, _options(processes=2), ranks=SimpleNamespace(rank=r, size=2)) for r in (0, 1)]
    alone = Trainer(tokenizer, _options())
    for step in range(2):
        (loss0, grads0, tokens0, main0), (loss1, grads1, tokens1, main1) = _gradients(ranks[0]), _gradients(ranks[1])
        if step == 0:  # rank 0 draws what one process alone draws; rank 1 other sequences
            assert np.array_equal(np.array(tokens0), np.array(alone.batch()[0]["tokens"]))
            assert not np.array_equal(np.array(tokens0), np.array(tokens1))
        assert logged[step]["loss"] == pytest.approx((float(loss0) + float(loss1)) / 2, rel=1e-5)
        mains = [main for main, _ in sequence_losses(logged[step])]
        assert mains == pytest.approx([main0, main1], rel=1e-4)
        assert [r["tokens"] for r in logged[step]["ranks"]] == [tokens0.shape[1], tokens1.shape[1]]
        assert logged[step]["ranks"][0]["kinds"] == sorted(logged[step]["kinds"], key=KINDS.index)
        ranks[0].optimizer.update(ranks[0]._joint, tree_map(lambda a, b: (a + b) / 2, grads0, grads1))
        mx.eval(ranks[0]._joint.parameters())
        ranks[1].optimizer.update(ranks[1]._joint, tree_map(lambda a, b: (a + b) / 2, grads0, grads1))
        ranks[1].step = ranks[0].step = step + 1

    saved = mx.load(str(out / "model.safetensors"))
    expected = ranks[0].official_weights()
    assert set(saved) == set(expected)
    moved = 0
    for name, value in expected.items():
        want, got = np.array(value), np.array(saved[name])
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(want).max())), name
    # and the step moved the weights away from where each rank's own gradient alone would take them
    single = Trainer(tokenizer, _options())
    for _ in range(2):
        loss, grads, _, _ = _gradients(single)
        single.optimizer.update(single._joint, grads)
        mx.eval(single._joint.parameters())
    for name, value in single.official_weights().items():
        moved += not np.allclose(np.array(value), np.array(saved[name]), rtol=1e-5, atol=1e-6)
    assert moved > len(expected) // 2


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    out = tmp_path / "run"
    assert main(["train-tiny", str(out), "--steps", "1", *FLAGS[2:]]) == 0
    with pytest.raises(ValueError, match=r"train_options.json: the run was trained with 1 process\(es\); resume it "
                                         r"with as many .*not 2"):
        Trainer(load_tokenizer(None), _options(processes=2), ranks=SimpleNamespace(rank=0, size=2)).resume(out)


def test_a_rank_that_fails_ends_every_rank_with_its_status(tmp_path, capfd):
    # nothing to resume: each rank raises, and the command exits with the first failure
    assert main(["train-tiny", str(tmp_path / "empty"), *FLAGS, "--processes", "2", "--resume"]) != 0
    assert "no saved training state to resume from" in capfd.readouterr().err


def test_the_trainer_refuses_a_process_count_other_than_its_options():
    with pytest.raises(ValueError, match="processes: the run's options say 2, and 1 process is training it"):
        Trainer(load_tokenizer(None), _options(processes=2))


def test_recipe_processes_are_checked_and_overridden(tmp_path, capsys):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps([{"run": "a", "steps": 1, "processes": 0}]))
    with pytest.raises(RecipeError, match="run 0 \\('a'\\): processes must be a positive integer"):
        load_recipe(str(path))
    path.write_text(json.dumps([{"run": "a", "steps": 1, "processes": 2},
                                {"run": "b", "steps": 1, "processes": 1, "init_from": "a"}]))
    assert main(["train-tiny", str(tmp_path / "out"), "--recipe", str(path)]) == 2
    assert "its runs ask for 1 and 2 processes; give --processes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_parallel_benchmark_times_both_sides(tmp_path, capsys, monkeypatch):
    import importlib.util
    import re
    import sys
    from pathlib import Path

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps([{"run": "only", "steps": 9, "seed": 5, "init_from": None, "max_tokens": 256,
                                   "mix": {"copy": 1.0}, "head_sample": 64, "config": {"o_lora_rank": 64}}]))
    path = Path(__file__).parent.parent / "benchmarks" / "train_parallel.py"
    spec = importlib.util.spec_from_file_location("train_parallel", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["train_parallel.py", "--recipe", str(recipe), "--steps", "4", "--rounds", "1"])
    bench.main()
    printed = capsys.readouterr().out
    one, two, ratio = map(float, re.search(r"^\| 1 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$", printed, re.M).groups())
    assert one > 0 and two > 0 and abs(ratio - two / one) < 0.01
    assert f"2 processes train {ratio:.2f}x the sequences a second of one" in printed


def test_ranks_wait_for_a_late_rank_asleep_at_the_barrier():
    import re
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "train_parallel.py"
    printed = subprocess.run([sys.executable, str(path), "--waiting", "--seconds", "1"], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    row = re.search(r"^\| LocalBarrier, then all_sum \| ([\d.]+) \| ([\d.]+) \|$", printed, re.M)
    wall, cpu = map(float, row.groups())
    assert wall >= 0.9  # it waited for the late rank
    assert cpu < 0.25  # and slept meanwhile
    assert re.search(r"^\| MLX all_sum \| ([\d.]+) \| ([\d.]+) \|$", printed, re.M)
