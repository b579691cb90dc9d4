"""Long-context retrieval: needle in a haystack, multi-document and codebase questions at given sizes.

    python benchmarks/retrieval.py [--model DIR] [--sizes 32K,128K,512K,1M] [--tasks needle,multidoc,codebase,keyvalue]
        [--depths 0,25,50,75,100] [--cases 3] [--seed 0] [--max-new-tokens 32] [--prefill-step 2048]
        [--max-kv-size SIZE|auto] [--json FILE] [--plot FILE.png]

Every case is generated from --seed (mlx_dsv4.retrieval_tasks), encoded in the V4 chat format with the
model's tokenizer to the requested token count, prefilled in chunks and answered greedily; an answer is
right when it matches the expected one after normalisation (case, quotes, final punctuation). Prints the
prefill progress of each case and a table of accuracy per task and size.

Without --model it runs the tiny V4 shipped in the package, which learned only the key-value lookup,
on that task at 1K to 8K tokens (TRAINED_SIZES) unless --sizes and --tasks say otherwise.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from mlx_dsv4.cli.common import add_memory_arguments, positive_int
from mlx_dsv4.retrieval_tasks import (DEFAULT_DEPTHS, MIN_SIZE, TASKS, RetrievalSizeError, format_tokens,
                                      is_correct, iter_cases)
from mlx_dsv4.sizes import parse_token_counts

DEFAULT_SIZES = "32K,128K,512K,1M"
TRAINED_SIZES = "1K,2K,4K,8K"
RANDOM_WEIGHTS_NOTE = ("{model} holds random weights (a tiny test checkpoint from mlx_dsv4.tiny): the scores "
                       "below are meaningless; they only show that the harness runs end to end")


def parse_sizes(text: str) -> list:
    """Token counts from "32K,128K,1M" (K = 1024, M = 1048576 tokens; see mlx_dsv4.sizes), sorted, unique."""
    try:
        return parse_token_counts(text, minimum=MIN_SIZE)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_depths(text: str) -> list:
    """Needle depths in percent, "0,25,50,75,100" -> [0.0, 0.25, 0.5, 0.75, 1.0]."""
    depths = []
    for item in text.split(","):
        try:
            value = float(item.strip().rstrip("%"))
        except ValueError:
            value = float("nan")
        if not 0 <= value <= 100:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not a depth: give percentages from 0 to 100")
        depths.append(value / 100)
    return depths


def parse_tasks(text: str) -> list:
    tasks = [t.strip() for t in text.split(",")]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task {unknown[0]!r}; expected some of {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path,
                   help="checkpoint directory (converted or Hub float layout; default: the tiny trained one)")
    p.add_argument("--sizes", type=parse_sizes,
                   help=f"prompt sizes in tokens, comma separated (default {DEFAULT_SIZES}; {TRAINED_SIZES} for "
                        f"the tiny trained model)")
    p.add_argument("--tasks", type=parse_tasks, help=f"default {','.join(TASKS)} (keyvalue for the tiny trained model)")
    p.add_argument("--depths", type=parse_depths, default=list(DEFAULT_DEPTHS),
                   help="needle depths in percent of the haystack (default 0,25,50,75,100)")
    p.add_argument("--cases", type=positive_int, default=3, help="multi-document and codebase cases per size "
                                                                 "(default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generated case (default 0)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length limit (default 32)")
    add_memory_arguments(p, what="cases")
    p.add_argument("--json", type=Path, help="write the results (every case, and accuracy per task and size) here")
    p.add_argument("--plot", type=Path, help="write a PNG of accuracy against size, one line per task")
    return p


class PrefillProgress:
    """Prefill progress of one case on stderr: rewritten in place on a terminal, one line per
    tenth of the prompt otherwise."""

    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.perf_counter()
        self.tenths = -1

    def __call__(self, done: int, total: int):
        tenths = 10 * done // max(total, 1)
        if not self.tty and tenths == self.tenths and done < total:
            return
        self.tenths = tenths
        elapsed = time.perf_counter() - self.started
        rate = f", {done / elapsed:.0f} tok/s" if elapsed > 0 and done else ""
        line = f"{self.label}: prefilled {done}/{total} tokens{rate}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def is_memory_error(error: BaseException) -> bool:
    """MLX reports a failed allocation as a RuntimeError naming the allocation or the memory."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("memory" in text or "alloc" in text)


def run_case(model, tokenizer, case, label: str, args) -> dict:
    from mlx_dsv4.chat import parse_completion
    from mlx_dsv4.generate import generate

    t0 = time.perf_counter()
    result = generate(model, tokenizer, case.ids, max_tokens=args.max_new_tokens, prefill_step=args.prefill_step,
                      kv_cache_limit=args.max_kv_size, progress=PrefillProgress(label))
    if result.finish_reason == "interrupted":
        raise KeyboardInterrupt
    output = parse_completion(result.text, "chat", strict=False)["content"].strip()
    correct = is_correct(output, case.answer)
    print(f"{label} {'right' if correct else 'wrong'}: expected {case.answer!r}, got {output[:80]!r} "
          f"({time.perf_counter() - t0:.1f} s, prefill {result.stats['prompt_tps']:.0f} tok/s)", flush=True)
    return {"output": output, "correct": correct, "seconds": round(time.perf_counter() - t0, 3),
            "prompt_tps": round(result.stats["prompt_tps"], 1), "peak_memory": result.stats["peak_memory"]}


def case_record(case) -> dict:
    meta = {k: v for k, v in case.meta.items() if k not in ("target", "profile", "record")}
    return {"task": case.task, "size": case.size, "label": case.label, "prompt_tokens": len(case.ids),
            "question": case.question, "answer": case.answer, "meta": meta}


def run_suite(model, tokenizer, args, prompt_tokens, records: list) -> None:
    """Every case of every task and size, run in order, appended to ``records``; failures are
    recorded, not raised."""
    from mlx_dsv4.generate import KVCacheLimitError, check_kv_limit

    out_of_memory_at = None
    for size in args.sizes:
        target = prompt_tokens(size)
        refused = None
        if out_of_memory_at is not None:
            refused = f"skipped: ran out of memory at {format_tokens(out_of_memory_at)}"
        elif args.max_kv_size is not None:
            try:
                check_kv_limit(model, target, args.max_new_tokens, args.max_kv_size, args.prefill_step)
            except KVCacheLimitError as e:
                refused = f"--max-kv-size: {e}"
        for task in args.tasks:
            if refused is not None:
                print(f"[{task} {format_tokens(size)}] {refused}", flush=True)
                records.append({"task": task, "size": size, "label": "all", "error": refused})
                continue
            cases = iter_cases(tokenizer, task, target, seed=args.seed, depths=args.depths, cases=args.cases)
            try:
                for case in cases:
                    label = f"[{task} {format_tokens(size)} {case.label}]"
                    record = case_record(case)
                    record["size"] = size
                    records.append(record)
                    try:
                        record.update(run_case(model, tokenizer, case, label, args))
                    except KVCacheLimitError as e:
                        record["error"] = f"--max-kv-size: {e}"
                    except (MemoryError, RuntimeError) as e:
                        if not is_memory_error(e):
                            raise
                        record["error"] = f"out of memory: {e}"
                        out_of_memory_at = size
                    if "error" in record:
                        print(f"{label} {record['error']}", flush=True)
                    if out_of_memory_at is not None:
                        refused = f"skipped: ran out of memory at {format_tokens(out_of_memory_at)}"
                        break
            except RetrievalSizeError as e:
                print(f"[{task} {format_tokens(size)}] cannot build the cases: {e}", flush=True)
                records.append({"task": task, "size": size, "label": "all", "error": str(e)})


def accuracy_table(records, tasks, sizes) -> dict:
    """{task: {size: {"right", "ran", "errors", "accuracy"}}}; accuracy None where no case ran."""
    table = {}
    for task in tasks:
        for size in sizes:
            rows = [r for r in records if r["task"] == task and r["size"] == size]
            ran = [r for r in rows if "correct" in r]
            right = sum(r["correct"] for r in ran)
            table.setdefault(task, {})[size] = {
                "right": right, "ran": len(ran), "errors": len(rows) - len(ran),
                "accuracy": right / len(ran) if ran else None,
            }
    return table


def format_table(table, tasks, sizes) -> str:
    lines = ["| task | " + " | ".join(format_tokens(s) for s in sizes) + " |",
             "| --- |" + " --- |" * len(sizes)]
    for task in tasks:
        cells = []
        for size in sizes:
            c = table[task][size]
            cell = f"{c['right']}/{c['ran']} ({c['accuracy']:.0%})" if c["ran"] else "not run"
            if c["errors"]:
                cell += f", {c['errors']} failed" if c["ran"] else f" ({c['errors']} failed)"
            cells.append(cell)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(path: Path, table, tasks, sizes, random_weights: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for task in tasks:
        points = [(s, table[task][s]["accuracy"]) for s in sizes if table[task][s]["accuracy"] is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [format_tokens(s) for s in sizes])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("accuracy")
    ax.set_title("long-context retrieval" + (" (random weights: meaningless)" if random_weights else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is None:
        from mlx_dsv4.train import trained_checkpoint

        args.model = trained_checkpoint()
        args.sizes = args.sizes or parse_sizes(TRAINED_SIZES)
        args.tasks = args.tasks or ["keyvalue"]
    args.sizes = args.sizes or parse_sizes(DEFAULT_SIZES)
    args.tasks = args.tasks or list(TASKS)
    from mlx_dsv4 import CheckpointError, ConfigError
    from mlx_dsv4.loader import read_checkpoint_config
    from mlx_dsv4.tiny import has_random_weights

    try:
        _, config, model_args = read_checkpoint_config(args.model)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    limit = model_args.max_position_embeddings
    too_long = [s for s in args.sizes if s > limit]
    if too_long:
        print(f"error: --sizes {format_tokens(too_long[0])} ({too_long[0]} tokens) is beyond the model's context: "
              f"max_position_embeddings is {limit} in {args.model / 'config.json'}", file=sys.stderr)
        return 2
    if args.max_new_tokens >= limit - MIN_SIZE:
        print(f"error: --max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
              f"{limit} positions", file=sys.stderr)
        return 2
    random_weights = has_random_weights(config)
    note = RANDOM_WEIGHTS_NOTE.format(model=args.model) if random_weights else None

    from mlx_dsv4 import load
    from mlx_dsv4.device_memory import MemoryFitError

    try:
        model, tokenizer = load(args.model, context=max(args.sizes))
        model.set_cache_dtypes(args.kv_dtype, args.index_dtype)
        if args.max_kv_size == "auto":
            from mlx_dsv4.device_memory import auto_kv_limit

            args.max_kv_size = auto_kv_limit(model)
    except (CheckpointError, ConfigError, MemoryFitError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if note:
        print(f"NOTE: {note}.", flush=True)
    print(f"model {args.model}; sizes {', '.join(format_tokens(s) for s in args.sizes)}; tasks "
          f"{', '.join(args.tasks)}; seed {args.seed}; greedy, at most {args.max_new_tokens} new tokens", flush=True)

    # a size at the model's limit leaves room for the answer
    def prompt_tokens(size):
        return min(size, limit - args.max_new_tokens)

    t0 = time.perf_counter()
    records, interrupted = [], False
    try:
        run_suite(model, tokenizer, args, prompt_tokens, records)
    except KeyboardInterrupt:
        records = [r for r in records if "correct" in r or "error" in r]
        interrupted = True
        print("\ninterrupted: the results below are those of the cases that finished", flush=True)
    table = accuracy_table(records, args.tasks, args.sizes)
    print("\nLong-context retrieval: answers right / cases run")
    print(format_table(table, args.tasks, args.sizes))
    if note:
        print(f"\nNOTE: {note}.")
    if args.json:
        results = {
            "model": str(args.model), "random_weights": random_weights, "note": note, "seed": args.seed,
            "sizes": args.sizes, "tasks": args.tasks, "depths": args.depths, "cases_per_task": args.cases,
            "max_new_tokens": args.max_new_tokens, "seconds": round(time.perf_counter() - t0, 1),
            "accuracy": {task: {format_tokens(s): table[task][s] for s in args.sizes} for task in args.tasks},
            "cases": records,
        }
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, table, args.tasks, args.sizes, random_weights)
        print(f"wrote {args.plot}")
    if interrupted:
        return 130
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
