"""Evaluation of the trained tiny V4 on held-out synthetic tasks, printed as a markdown table.

    python benchmarks/eval_tiny.py [--model DIR] [--tool-n 40] [--retrieval-n 10] [--lengths 1024 2048 4096 8192]
                                   [--json OUT.json] [--plot LOSS.jsonl PNG]

DIR defaults to the checkpoint shipped in the package. Tool use runs the agent loop on held-out
numbers and phrasings, twice: with weather questions about training cities, then about cities
training never asks about. Retrieval, MTP acceptance and cache precision are greedy (see
mlx_dsv4.train.evaluate).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_dsv4 import load
from mlx_dsv4.train import evaluate, trained_checkpoint


def float32_copy(model):
    """The model with its quantised embedding and head dequantised and every weight float32, so that
    the activations (and the "float" cache) are float32."""
    for name in ("embed", "head"):
        layer = getattr(model, name)
        if isinstance(layer, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
            w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, mode=layer.mode)
            if name == "embed":
                new = nn.Embedding(*w.shape)
            else:
                new = nn.Linear(w.shape[1], w.shape[0], bias=False)
            new.weight = w.astype(mx.float32)
            setattr(model, name, new)
    model.update(nn.utils.tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                                   model.parameters()))
    mx.eval(model.parameters())
    return model


def plot_loss(log_path: Path, png: Path, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("main", "next token (assistant tokens)"), ("mtp", "MTP (next-but-one)"),
                       ("indexer_kl", "indexer KL")):
        ys = [r[key] for r in records]
        smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1])
                  for i in range(len(ys))]
        ax.plot([r["step"] for r in records], smooth, label=label)
    ax.set_xlabel("step")
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
    parser.add_argument("--retrieval-n", type=int, default=10)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--mtp-n", type=int, default=12)
    parser.add_argument("--cache-n", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--plot", nargs=2, type=Path, metavar=("LOSS_JSONL", "PNG"), help="plot a training loss log")
    args = parser.parse_args(argv)

    if args.plot:
        plot_loss(*args.plot)
    path = args.model or trained_checkpoint()
    model, tokenizer = load(path, mtp=True)
    results = {"model": str(path)}

    class Rows(list):
        def append(self, row):
            super().append(row)
            print("| " + " | ".join(row) + " |", flush=True)

    print("| measure | value | sample |\n| --- | --- | --- |", flush=True)
    rows = Rows()
    t0 = time.perf_counter()
    if args.loss_n:
        h = evaluate.heldout_loss(model, tokenizer, n=args.loss_n, seed=args.seed)
        results["heldout_loss"] = h
        rows.append(("held-out loss on assistant tokens (nats/token; uniform = 11.77)", f"{h['loss']:.3f}",
                     f"{h['tokens']} tokens"))
    for unseen, cities in ((False, "training cities"), (True, "unseen cities")) if args.tool_n else ():
        tool = evaluate.tool_use(model, tokenizer, n=args.tool_n, seed=args.seed, unseen_cities=unseen)
        results["tool_use" + ("_unseen_cities" if unseen else "")] = tool
        calls = evaluate.call_token_accuracy(model, tokenizer, n=args.tool_n, seed=args.seed, unseen_cities=unseen)
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
        cache_rows = evaluate.cache_precision(float32_copy(model), tokenizer, n=args.cache_n, seed=args.seed)
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
