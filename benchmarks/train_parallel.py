"""Training throughput of one process against N (`train-tiny --processes N`) on this machine: the
sequences a second each trains, in alternating rounds, and their ratio.

    python benchmarks/train_parallel.py [--recipe hour] [--run basics] [--processes 2] [--steps 12] [--rounds 2]
    python benchmarks/train_parallel.py --waiting [--seconds 2]

Each side trains the run's options from random weights (the weights do not change a step's cost) for
--steps steps through `train-tiny`; a step's time is the seconds its loss log records (the gradients,
their averaging over the processes and the update; each process draws its batch before), and the
first two steps, which build and warm, are left out. Run it on an otherwise idle machine.

--waiting measures why the ranks meet at a barrier first: two local ranks, rank 1 late by --seconds,
and the CPU seconds rank 0 spends waiting for it inside MLX's all_sum and at `LocalBarrier`.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from mlx_dsv4.train.recipe import load_recipe

WARM = 2


def sequences_per_second(options, processes: int, steps: int, work: Path) -> float:
    out = work / f"p{processes}"
    recipe = work / f"p{processes}.json"
    work.mkdir(parents=True, exist_ok=True)
    run = {**asdict(replace(options, init_from=None, steps=steps, processes=processes)), "run": "timed"}
    recipe.write_text(json.dumps([run]))
    subprocess.run([sys.executable, "-m", "mlx_dsv4.cli", "train-tiny", str(out), "--recipe", str(recipe),
                    "--save-every", str(steps)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = [json.loads(line)["seconds"] for line in (out / "timed" / "loss.jsonl").read_text().splitlines()]
    return processes * len(seconds[WARM:]) / sum(seconds[WARM:])


def waiting_rank(seconds: float) -> None:
    """Run as a rank of run_local_ranks: rank 0 prints its CPU seconds waiting for a late rank 1."""
    import time

    import mlx.core as mx

    from mlx_dsv4.distributed import init, leave

    ranks = init()
    x = mx.ones((1024,))
    spent = {}
    for way in ("all_sum", "barrier"):
        mx.eval(ranks.all_sum(x))  # start together
        if ranks.rank == 1:
            time.sleep(seconds)
        cpu, wall = time.process_time(), time.perf_counter()
        if way == "barrier":
            ranks.wait_for_all("waiting for the late rank")
        mx.eval(ranks.all_sum(x))
        spent[way] = (time.process_time() - cpu, time.perf_counter() - wall)
    if ranks.rank == 0:
        print("| rank 0 waits in | wall s | CPU s |\n| --- | --- | --- |")
        for way, (cpu, wall) in spent.items():
            print(f"| {'MLX all_sum' if way == 'all_sum' else 'LocalBarrier, then all_sum'} | {wall:.2f} | {cpu:.2f} |")
    leave(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", action="store_true")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--waiting-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default="hour")
    parser.add_argument("--run", default=None, help="the recipe's run whose options are timed (default: its first)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.waiting_rank:
        return waiting_rank(args.seconds)
    if args.waiting:
        from mlx_dsv4.distributed import run_local_ranks

        sys.exit(run_local_ranks([sys.executable, __file__, "--waiting-rank", "--seconds", str(args.seconds)], 2))
    if args.steps <= WARM:
        parser.error(f"--steps must be over {WARM}")
    stages = load_recipe(args.recipe)
    names = [s.name for s in stages]
    if args.run is not None and args.run not in names:
        parser.error(f"--run: {args.recipe} has the runs {', '.join(names)}")
    stage = stages[names.index(args.run) if args.run else 0]
    print(f"{args.recipe} / {stage.name}: {args.steps} steps a side ({WARM} left out), {args.rounds} rounds\n")
    print(f"| round | 1 process: seq/s | {args.processes} processes: seq/s | ratio |\n| --- | --- | --- | --- |")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            one = sequences_per_second(stage.options, 1, args.steps, Path(tmp) / f"r{i}")
            many = sequences_per_second(stage.options, args.processes, args.steps, Path(tmp) / f"r{i}")
            ratios.append(many / one)
            print(f"| {i + 1} | {one:.3f} | {many:.3f} | {many / one:.2f}x |", flush=True)
    print(f"\n{args.processes} processes train {sum(ratios) / len(ratios):.2f}x the sequences a second of one "
          f"(rounds: {', '.join(f'{r:.2f}x' for r in ratios)})")


if __name__ == "__main__":
    main()
