"""Tool use of training runs, one markdown row each: the run's training loss (next-token, mean of
its last non-retrieval steps in loss.jsonl), teacher-forced accuracy on the call turn's
argument tokens (all, and per tool) and on its other tokens (`evaluate.call_token_accuracy`), then
the agent round trips on held-out questions (`evaluate.tool_use`): correct final answer after the
expected call, expected call, expected tool, and the answer given the expected call and its result;
last, the correct final answers when the weather questions ask about training cities (the numbers
and phrasings still held out).

    python benchmarks/tool_progress.py RUN_DIR... [--calls-n 40] [--tool-n 16] [--seed 0] [--loss-steps 200]

RUN_DIR is what `mlx-dsv4 train-tiny` writes, read with `load_run` (float32 weights).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train import evaluate
from mlx_dsv4.train.trainer import load_run, sequence_losses

TOOLS = ("add", "calculate", "get_weather")


def training_loss(run, steps: int) -> float:
    """Mean next-token loss of the run's last `steps` sequences (one a step, or one per process) that
    were not retrieval lists (their loss is of another scale), from the log `mlx-dsv4 train-tiny` writes."""
    records = [json.loads(line) for line in (Path(run) / "loss.jsonl").read_text().splitlines() if line.strip()]
    losses = [main for r in records for main, kinds in sequence_losses(r) if kinds != ["retrieval"]][-steps:]
    return float(np.mean(losses)) if losses else float("nan")


def row(run, tokenizer, calls_n: int, tool_n: int, seed: int = 0, loss_steps: int = 200) -> dict:
    model, _, _ = load_run(run)
    calls = evaluate.call_token_accuracy(model, tokenizer, n=calls_n, seed=seed)
    tool = evaluate.tool_use(model, tokenizer, n=tool_n, seed=seed)
    seen = evaluate.tool_use(model, tokenizer, n=tool_n, seed=seed, unseen_cities=False)
    return {"loss": training_loss(run, loss_steps), "calls": calls, "tool": tool, "training_cities": seen}


def markdown(run, result) -> str:
    calls, tool = result["calls"], result["tool"]
    by_tool = calls["arguments_by_tool"]
    per_tool = [f"{by_tool[t]['right']}/{by_tool[t]['tokens']}" if t in by_tool else "-" for t in TOOLS]
    cells = [str(run), f"{result['loss']:.3f}", f"{calls['arguments']:.1%}", *per_tool, f"{calls['rest']:.1%}",
             f"{tool['correct']:.1%}", f"{tool['well_formed_call']:.1%}", f"{tool['right_tool']:.1%}",
             f"{tool['answer_after_result']:.1%}", f"{result['training_cities']['correct']:.1%}"]
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--calls-n", type=int, default=40)
    p.add_argument("--tool-n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-steps", type=int, default=200)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(None)
    print(f"| run | training loss (last {args.loss_steps} steps) | argument tokens right ({args.calls_n} examples) "
          f"| {' | '.join(TOOLS)} | other call tokens right "
          f"| correct final answer after the expected call ({args.tool_n} questions) | expected call | expected tool "
          "| answer right given the call and its result | correct final answer, training cities |")
    print("| --- " * 12 + "|")
    for run in args.runs:
        print(markdown(run, row(run, tokenizer, args.calls_n, args.tool_n, args.seed, args.loss_steps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
