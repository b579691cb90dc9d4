"""Evaluation of the trained tiny V4 on held-out synthetic tasks, printed as a markdown table.

    python benchmarks/eval_tiny.py [--model DIR] [--tool-n 40] [--chat-n 24] [--retrieval-n 10]
                                   [--lengths 1024 2048 4096 8192] [--json OUT.json] [--plot LOSS.jsonl|RUN_DIR PNG]

DIR defaults to the checkpoint shipped in the package. Tool use runs the agent loop on held-out
numbers and phrasings, twice: with weather questions about training cities, then about cities
training never asks about. Retrieval, MTP acceptance and cache precision are greedy (see
mlx_dsv4.train.evaluate). Generation runs on the checkpoint as shipped; the teacher-forced measures
(held-out loss, the call's tokens) and cache precision run on a float32 copy of it (the embedding
dequantised), whose whole-sequence logits a CPU computes many times faster than bfloat16 ones.
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

from mlx_dsv4 import load
from mlx_dsv4.train import evaluate, trained_checkpoint
from mlx_dsv4.train.ship import training_stages


def loss_records(source: Path) -> tuple:
    """(records, boundaries) of a training loss log: `source` is a loss.jsonl, or a run directory
    whose runs (`training_stages`: the run and those it started from) are joined end to end, each
    up to the step the next one took its weights at; boundaries are the steps where a run begins."""
    if source.is_file():
        return [json.loads(line) for line in source.read_text().splitlines()], []
    records, boundaries, offset = [], [], 0
    for stage in training_stages(source):
        log = [json.loads(line) for line in (source.parent / stage["run"] / "loss.jsonl").read_text().splitlines()]
        log = [r for r in log if r["step"] < stage["stopped_at_step"]]
        if records:
            boundaries.append(offset)
        records += [{**r, "step": r["step"] + offset} for r in log]
        offset += stage["stopped_at_step"]
    return records, boundaries


def plot_loss(source: Path, png: Path, window: int = 0) -> None:
    """The losses of `loss_records(source)`, each a running mean over `window` steps (default: a
    two-hundredth of the steps, at least 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, boundaries = loss_records(source)
    window = window or max(10, len(records) // 200)
    fig, ax = plt.subplots(figsize=(9 if boundaries else 7, 4))
    for key, label in (("main", "next token (assistant tokens)"), ("mtp", "MTP (next-but-one)"),
                       ("indexer_kl", "indexer KL")):
        ys = [r[key] for r in records]
        smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1])
                  for i in range(len(ys))]
        ax.plot([r["step"] for r in records], smooth, label=label, linewidth=0.8 if boundaries else 1.5)
    for step in boundaries:
        ax.axvline(step, color="grey", linewidth=0.5, alpha=0.5)
    ax.set_xlabel("step" + (f" ({len(boundaries) + 1} runs, each from the last one's weights)" if boundaries else ""))
    ax.set_ylabel(f"loss ({window}-step mean)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("tiny V4 training on synthetic tasks")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-n", type=int, default=12)
    parser.add_argument("--tool-n", type=int, default=40)
    parser.add_argument("--chat-n", type=int, default=24)
    parser.add_argument("--retrieval-n", type=int, default=10)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--mtp-n", type=int, default=12)
    parser.add_argument("--cache-n", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--plot", nargs=2, type=Path, metavar=("LOSS_JSONL_OR_RUN", "PNG"),
                        help="plot a training loss log, or those of a run directory and the runs it started from")
    args = parser.parse_args(argv)

    if args.plot:
        plot_loss(*args.plot)
    path = args.model or trained_checkpoint()
    model, tokenizer = load(path, mtp=True)
    results = {"model": str(path)}

    @functools.cache
    def float32_model():
        return evaluate.float32_copy(load(path, mtp=True)[0])

    class Rows(list):
        def append(self, row):
            super().append(row)
            print("| " + " | ".join(row) + " |", flush=True)

    print("| measure | value | sample |\n| --- | --- | --- |", flush=True)
    rows = Rows()
    t0 = time.perf_counter()
    if args.loss_n:
        h = evaluate.heldout_loss(float32_model(), tokenizer, n=args.loss_n, seed=args.seed)
        results["heldout_loss"] = h
        rows.append(("held-out loss on assistant tokens (nats/token; uniform = 11.77)", f"{h['loss']:.3f}",
                     f"{h['tokens']} tokens"))
    for unseen, cities in ((False, "training cities"), (True, "unseen cities")) if args.tool_n else ():
        tool = evaluate.tool_use(model, tokenizer, n=args.tool_n, seed=args.seed, unseen_cities=unseen)
        results["tool_use" + ("_unseen_cities" if unseen else "")] = tool
        calls = evaluate.call_token_accuracy(float32_model(), tokenizer, n=args.tool_n, seed=args.seed,
                                             unseen_cities=unseen)
        results["call_tokens" + ("_unseen_cities" if unseen else "")] = calls
        n, arguments, rest = f"n={tool['n']}", f"{calls['arguments_tokens']} tokens", f"{calls['rest_tokens']} tokens"
        for label, value, sample in (
                ("correct final answer after a well-formed call", tool["correct"], n),
                ("expected call with expected arguments", tool["well_formed_call"], n),
                ("call names the expected tool", tool["right_tool"], n),
                ("final answer right, given the expected call and its result", tool["answer_after_result"], n),
                ("call's argument tokens right, teacher-forced", calls["arguments"], arguments),
                ("call's other tokens right, teacher-forced", calls["rest"], rest)):
            rows.append((f"tool use ({cities}): {label}", f"{value:.1%}", sample))
    if args.chat_n:
        c = evaluate.chat_accuracy(model, tokenizer, n=args.chat_n, seed=args.seed)
        results["chat"] = c
        rows.append(("chat: exact reply (capital / repeat / greeting)",
                     f"{c['accuracy']:.1%} ({c['capital']:.0%} / {c['repeat']:.0%} / {c['greeting']:.0%})",
                     f"n={c['n']}"))
    for length in args.lengths:
        r = evaluate.retrieval(model, tokenizer, length, n=args.retrieval_n, seed=args.seed)
        results[f"retrieval_{length}"] = r
        rows.append((f"retrieval, ~{r['tokens']} tokens", f"{r['accuracy']:.1%}", f"n={r['n']}"))
    if args.mtp_n:
        m = evaluate.mtp_acceptance(model, tokenizer, n=args.mtp_n, seed=args.seed)
        results["mtp"] = m
        rows.append(("MTP acceptance (argmax == next-but-one greedy token)", f"{m['acceptance']:.1%}",
                     f"{m['positions']} positions"))
    if args.cache_n:
        cache_rows = evaluate.cache_precision(float32_model(), tokenizer, n=args.cache_n, seed=args.seed)
        results["cache_precision"] = cache_rows
        for c in cache_rows:
            rows.append((f"cache {c['storage']} vs float32 dense forward: mean KL / argmax agreement",
                         f"{c['mean_kl']:.2e} / {c['argmax_agreement']:.1%}", f"n={args.cache_n} x 32 steps"))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if results.get("tool_use", {}).get("failures"):
        print("\nfirst tool-use failures:", json.dumps(results["tool_use"]["failures"][:3], ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
