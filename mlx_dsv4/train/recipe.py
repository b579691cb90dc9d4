"""Training recipes: a sequence of `train-tiny` runs, each starting from the weights of the one
before, run by one command (`mlx-dsv4 train-tiny OUT --recipe NAME|FILE`).

A recipe file has the form of the shipped checkpoint's training.json (`ship.training_stages`): a
JSON list of runs, each with a unique "run" name, TrainOptions fields, "init_from" (the name of an
earlier run, or null for the first) and optionally "stopped_at_step" (where the next run takes the
weights: the learning-rate schedule still follows "steps"). The built-in recipe "hour" is the
curriculum of docs/tiny-model.md's "Training in about an hour".
"""

import json
from dataclasses import dataclass
from pathlib import Path

from .trainer import TrainOptions

_HERE = Path(__file__).resolve().parent
BUILT_IN = {"hour": _HERE / "recipes" / "hour.json"}
_STAGE_KEYS = {"run", "init_from", "stopped_at_step"}


class RecipeError(ValueError):
    """A recipe file that cannot be run."""


@dataclass
class Stage:
    name: str
    options: TrainOptions  # init_from: the earlier stage's name (None for the first)
    stop_at: int  # the step after which the next stage takes the weights

    def out_dir(self, root: Path) -> Path:
        return Path(root) / self.name


def recipe_path(name_or_path: str) -> Path:
    """A built-in recipe's file, or the path given."""
    return BUILT_IN.get(name_or_path, Path(name_or_path))


def load_recipe(name_or_path: str) -> list:
    """The stages of a recipe file (see the module's docstring), checked: errors name the file, the
    run and the field."""
    path = recipe_path(name_or_path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        known = ", ".join(sorted(BUILT_IN))
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror}; built-in recipes: {known})") from None
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{path}: a recipe is a non-empty JSON list of runs")
    fields = set(vars(TrainOptions()))
    stages, names = [], set()
    for i, entry in enumerate(raw):
        where = f"{path}: run {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("run"), str) or not entry["run"]:
            raise RecipeError(f"{where}: each run is an object with a \"run\" name")
        name = entry["run"]
        where = f"{path}: run {i} ({name!r})"
        if name in names or "/" in name or name in (".", ".."):
            raise RecipeError(f"{where}: run names must be unique directory names")
        unknown = sorted(set(entry) - fields - _STAGE_KEYS)
        if unknown:
            raise RecipeError(f"{where}: unknown field {unknown[0]!r} (not a TrainOptions field)")
        parent = entry.get("init_from")
        if (i == 0) != (parent is None) or (parent is not None and parent != stages[-1].name):
            expected = "null" if i == 0 else repr(stages[-1].name)
            raise RecipeError(f"{where}: init_from must be {expected} (each run starts from the one before)")
        options = TrainOptions.from_saved(entry)
        if not isinstance(options.steps, int) or options.steps < 1:
            raise RecipeError(f"{where}: steps must be a positive integer")
        if not isinstance(options.processes, int) or options.processes < 1:
            raise RecipeError(f"{where}: processes must be a positive integer")
        stop = entry.get("stopped_at_step", options.steps)
        if not isinstance(stop, int) or not 0 < stop <= options.steps:
            raise RecipeError(f"{where}: stopped_at_step must be an integer in 1..steps ({options.steps})")
        stages.append(Stage(name, options, stop))
        names.add(name)
    return stages


def recipe_steps(stages) -> int:
    """Optimizer steps the recipe runs in all."""
    return sum(stage.stop_at for stage in stages)
