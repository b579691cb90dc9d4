"""How long a training recipe takes on this machine: each run's first steps timed (wall clock, the
batch built and the step taken, as `train-tiny` runs them), times its step count.

    python benchmarks/recipe_time.py [--recipe hour] [--steps 40]

Each run starts from random weights (the weights do not change a step's cost) with its own options
and data; the first step, which builds and warms, is left out. Run it on an otherwise idle
machine: the figure is for one core (a recipe whose runs train with several processes is timed with
one; `benchmarks/train_parallel.py` measures what more processes give).
"""

import argparse
import time
from dataclasses import replace

from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train.recipe import load_recipe, recipe_steps
from mlx_dsv4.train.trainer import Trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="hour")
    parser.add_argument("--steps", type=int, default=40, help="steps timed per run")
    args = parser.parse_args()
    tokenizer = load_tokenizer(None)
    stages = load_recipe(args.recipe)
    total = 0.0
    print("| run | steps | timed | s/step | minutes |\n| --- | --- | --- | --- | --- |")
    for stage in stages:
        trainer = Trainer(tokenizer, replace(stage.options, init_from=None, processes=1))
        trainer.train_step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        per_step = (time.perf_counter() - t0) / args.steps
        total += per_step * stage.stop_at
        minutes = per_step * stage.stop_at / 60
        print(f"| {stage.name} | {stage.stop_at} | {args.steps} | {per_step:.3f} | {minutes:.1f} |", flush=True)
    print(f"\n{args.recipe}: {recipe_steps(stages)} steps, about {total / 60:.0f} minutes of one core")
    processes = max(stage.options.processes for stage in stages)
    if processes > 1:
        print(f"(timed with one process; the recipe's runs train with up to {processes}, each step on as many "
              f"sequences: benchmarks/train_parallel.py times that)")


if __name__ == "__main__":
    main()
