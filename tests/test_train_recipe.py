"""Training recipes: several `train-tiny` runs, each from the one before, run by one command."""

import json
from pathlib import Path

import pytest

from mlx_dsv4.cli import main
import mlx_dsv4
from mlx_dsv4.train.recipe import BUILT_IN, RecipeError, load_recipe, recipe_steps
from mlx_dsv4.train.ship import training_stages

SHIPPED = Path(mlx_dsv4.__file__).parent / "tiny_trained"
SMALL = {"max_tokens": 256, "mix": {"copy": 1.0}, "head_sample": 64, "config": {"o_lora_rank": 64}}


def _write(path, runs):
    path.write_text(json.dumps(runs))
    return str(path)


def test_the_shipped_training_json_is_a_recipe_of_its_runs():
    stages = load_recipe(str(SHIPPED / "training.json"))
    shipped = json.loads((SHIPPED / "training.json").read_text())
    assert [s.name for s in stages] == [r["run"] for r in shipped]
    assert [s.stop_at for s in stages] == [r["stopped_at_step"] for r in shipped]
    assert recipe_steps(stages) == sum(r["stopped_at_step"] for r in shipped)
    last = stages[-1].options
    assert (last.filler_leads, last.head_sample, last.lr, last.init_from) == (
        shipped[-1]["filler_leads"], shipped[-1]["head_sample"], shipped[-1]["lr"], shipped[-2]["run"])
    assert isinstance(last.retrieval_tokens, tuple)


def test_the_hour_recipe_loads_and_starts_from_scratch():
    stages = load_recipe("hour")
    assert load_recipe(str(BUILT_IN["hour"])) == stages
    assert stages[0].options.init_from is None and len(stages) >= 2
    assert all(s.options.head_sample for s in stages)  # the whole-vocabulary head would not fit the hour
    assert recipe_steps(stages) == sum(s.stop_at for s in stages) <= sum(s.options.steps for s in stages)
    assert stages[-1].stop_at == stages[-1].options.steps  # the result is a finished schedule


@pytest.mark.parametrize("runs, message", [
    ({"run": "a"}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    ([{"steps": 2}], "\"run\" name"),
    ([{"run": "a", "steps": 2, "init_from": None, "learning_rate": 1}], "run 0 ('a'): unknown field 'learning_rate'"),
    ([{"run": "a", "steps": 2, "init_from": "z"}], "run 0 ('a'): init_from must be null"),
    ([{"run": "a", "steps": 2}, {"run": "b", "steps": 2}], "run 1 ('b'): init_from must be 'a'"),
    ([{"run": "a", "steps": 2}, {"run": "a", "steps": 2, "init_from": "a"}], "run 1 ('a'): run names must be unique"),
    ([{"run": "../a", "steps": 2}], "unique directory names"),
    ([{"run": "a", "steps": 0}], "steps must be a positive integer"),
    ([{"run": "a", "steps": 3, "stopped_at_step": 4}], "stopped_at_step must be an integer in 1..steps (3)"),
])
def test_recipe_errors_name_the_file_run_and_field(tmp_path, runs, message):
    path = _write(tmp_path / "recipe.json", runs)
    with pytest.raises(RecipeError, match="recipe.json") as err:
        load_recipe(path)
    assert message in str(err.value)


def test_unreadable_recipes_say_why(tmp_path):
    with pytest.raises(RecipeError, match="cannot read the recipe .*built-in recipes: hour"):
        load_recipe(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('[{"run": "a",}]')
    with pytest.raises(RecipeError, match="bad.json: not JSON: .* line 1 column 14"):
        load_recipe(str(tmp_path / "bad.json"))


def test_train_tiny_runs_a_recipe_in_one_command_and_resumes_it(tmp_path, capsys):
    recipe = _write(tmp_path / "recipe.json", [
        {"run": "first", "steps": 3, "stopped_at_step": 2, "seed": 5, "init_from": None, **SMALL},
        {"run": "second", "steps": 2, "seed": 6, "lr": 1e-3, "init_from": "first", **SMALL}])
    out = tmp_path / "runs"
    assert main(["train-tiny", str(out), "--recipe", recipe, "--save-every", "1"]) == 0
    assert "recipe " in capsys.readouterr().out
    assert [(s["run"], s["stopped_at_step"]) for s in training_stages(out / "second")] == [("first", 2), ("second", 2)]
    first = [json.loads(line) for line in (out / "first" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [0, 1]
    options = json.loads((out / "second" / "train_options.json").read_text())
    assert options["init_from"] == str(out / "first") and options["lr"] == 1e-3 and options["seed"] == 6

    # the recipe's first run is the run that train-tiny's own options give
    alone = tmp_path / "alone"
    assert main(["train-tiny", str(alone), "--steps", "3", "--seed", "5", "--max-tokens", "256", "--mix", "copy=1",
                 "--head-sample", "64", "--config", "o_lora_rank=64"]) == 0
    assert [json.loads(line)["loss"] for line in (alone / "loss.jsonl").read_text().splitlines()[:2]] == [
        r["loss"] for r in first]

    # resuming skips the runs already done and leaves their files alone
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train-tiny", str(out), "--recipe", recipe, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "run 1/2 first: done (2 steps)" in printed and "run 2/2 second: done (2 steps)" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_recipe_refuses_other_training_options(tmp_path, capsys):
    recipe = _write(tmp_path / "recipe.json", [{"run": "a", "steps": 1}])
    assert main(["train-tiny", str(tmp_path / "out"), "--recipe", recipe, "--lr", "1e-3", "--seed", "3"]) == 2
    assert "drop --lr, --seed" in capsys.readouterr().err
    assert main(["train-tiny", str(tmp_path / "out"), "--recipe", str(tmp_path / "none.json")]) == 2
    assert "cannot read the recipe" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_recipe_time_times_each_run_and_adds_them_up(tmp_path, capsys, monkeypatch):
    import importlib.util
    import re
    import sys

    recipe = _write(tmp_path / "recipe.json", [
        {"run": "first", "steps": 30, "stopped_at_step": 20, "init_from": None, **SMALL},
        {"run": "second", "steps": 10, "init_from": "first", "processes": 2, **SMALL}])
    path = Path(__file__).parent.parent / "benchmarks" / "recipe_time.py"
    spec = importlib.util.spec_from_file_location("recipe_time", path)
    recipe_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_time)
    monkeypatch.setattr(sys, "argv", ["recipe_time.py", "--recipe", recipe, "--steps", "1"])
    recipe_time.main()
    printed = capsys.readouterr().out
    rows = re.findall(r"^\| (\w+) \| (\d+) \| 1 \| ([\d.]+) \| ([\d.]+) \|$", printed, re.M)
    assert [(name, int(steps)) for name, steps, _, _ in rows] == [("first", 20), ("second", 10)]
    minutes = sum(float(per_step) * int(steps) for _, steps, per_step, _ in rows) / 60
    total = float(re.search(r"30 steps, about (\d+) minutes", printed).group(1))
    assert abs(total - minutes) <= 0.5
    assert "(timed with one process; the recipe's runs train with up to 2," in printed


def test_resume_without_a_saved_state_names_the_missing_file(tmp_path):
    from mlx_dsv4.tokenizer import load_tokenizer
    from mlx_dsv4.train.trainer import Trainer, TrainOptions, saved_step

    assert saved_step(tmp_path) is None
    trainer = Trainer(load_tokenizer(None), TrainOptions.from_saved({"steps": 2, "unknown": 1, **SMALL}))
    with pytest.raises(FileNotFoundError, match="train_state/step.json: no saved training state"):
        trainer.resume(tmp_path)
    trainer.train_step()
    trainer.save_official(tmp_path)
    assert saved_step(tmp_path) == 1
