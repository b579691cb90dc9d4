"""Load test of `mlx-dsv4 serve`: concurrent streaming clients through the official openai client.

Each of ``--clients`` threads sends ``--requests`` streaming chat completions one after
another; the script prints requests/s and p50/p95 request latency (send to [DONE]) and
the server's memory before and after (from /health).

    python benchmarks/server_load.py --base-url http://127.0.0.1:8080 --model NAME [--api-key KEY]
    python benchmarks/server_load.py --tiny    # starts a server on a tiny random checkpoint

``--batching`` measures continuous batching instead: aggregate decode tokens/s of 1, 4 and 8
concurrent greedy streams against an in-process engine (``--max-batch``, default 8), on the
tiny test model and on the reduced-width bench model (``mlx-dsv4 bench --hidden-size 256 ...``,
see docs/performance.md), with the ratio to 1 stream and, for reference, 4 streams decoded one
at a time (``--max-batch 1``). Decode rate: the tokens after each stream's first, over the
time from the first token of any stream to the last (the short prompts of later streams
prefill inside it, as they would under load), in wall-clock seconds and in CPU seconds of
the process (what other work on a shared machine disturbs least).

    python benchmarks/server_load.py --batching
"""

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx


def _percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def run_load(base_url, model, *, api_key="none", clients=16, requests=4, max_tokens=3, deadline_s=300):
    """Run the load; returns a dict of counts, latencies and memory readings."""
    import openai

    client = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=deadline_s)
    health = lambda: httpx.get(base_url.rstrip("/") + "/health", timeout=30).json()  # noqa: E731
    latencies, failures, finishes = [], [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def worker(c):
        for r in range(requests):
            if time.monotonic() > stop_at:
                with lock:
                    failures.append(f"client {c} request {r}: deadline passed before it was sent")
                continue
            t0 = time.perf_counter()
            try:
                stream = client.chat.completions.create(
                    model=model, stream=True, max_tokens=max_tokens,
                    messages=[{"role": "user", "content": f"load client {c} request {r}: say something"}],
                )
                reason = None
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        reason = chunk.choices[0].finish_reason
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    finishes.append(reason)
            except Exception as err:  # noqa: BLE001 - counted as a lost request
                with lock:
                    failures.append(f"client {c} request {r}: {type(err).__name__}: {err}")

    before = health()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + 30)
    wall = time.perf_counter() - t0
    after = health()
    done = len(latencies)
    return {
        "sent": clients * requests,
        "completed": done,
        "failures": failures,
        "finish_reasons": finishes,
        "wall_s": wall,
        "requests_per_s": done / wall if wall else 0.0,
        "p50_s": _percentile(latencies, 50),
        "p95_s": _percentile(latencies, 95),
        "mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "health_before": before,
        "health_after": after,
    }


def report(stats):
    mb = 1 / (1024 * 1024)
    b, a = stats["health_before"]["memory"], stats["health_after"]["memory"]
    return (
        f"{stats['completed']}/{stats['sent']} requests in {stats['wall_s']:.1f} s: "
        f"{stats['requests_per_s']:.2f} req/s, latency p50 {stats['p50_s']:.2f} s, p95 {stats['p95_s']:.2f} s; "
        f"server RSS {b['rss_bytes'] * mb:.0f} -> {a['rss_bytes'] * mb:.0f} MiB, "
        f"MLX active {b['active_bytes'] * mb:.1f} -> {a['active_bytes'] * mb:.1f} MiB"
    )


# The reduced-width model of docs/performance.md: V4-Flash's structure at small widths.
REDUCED_WIDTH_FLAGS = ["--hidden-size", "256", "--num-attention-heads", "4", "--q-lora-rank", "64",
                       "--o-groups", "2", "--o-lora-rank", "64", "--index-n-heads", "4",
                       "--moe-intermediate-size", "128", "--vocab-size", "8192", "--layers", "4,128"]


def reduced_width_checkpoint(log=print):
    from mlx_dsv4 import bench
    from mlx_dsv4.cli.bench import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return bench.ensure_checkpoint(p.parse_args(REDUCED_WIDTH_FLAGS), log)


def tiny_checkpoint():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_server_support import checkpoint_dir

    return checkpoint_dir()


def decode_rate(engine, streams, *, max_tokens=64, prompt_tokens=64):
    """Aggregate decode rates of ``streams`` concurrent greedy streams (prompts of different
    lengths) through ``engine``: the tokens after each stream's first, over the time from the
    first token of any stream to the last, as (tokens per second, tokens per CPU second of
    this process: on a shared machine the figure that other processes disturb least)."""
    import asyncio

    import numpy as np

    from mlx_dsv4.sampling import SamplingParams
    from mlx_dsv4.server.engine import StepLog

    rng = np.random.default_rng(streams)
    vocab = engine.model.args.vocab_size
    prompts = [rng.integers(0, vocab, prompt_tokens + 8 * i).tolist() for i in range(streams)]

    async def one(ids):
        arrivals = []
        async for _ in engine.stream(None, ids, SamplingParams(max_tokens=max_tokens), StepLog()):
            arrivals.append((time.perf_counter(), time.process_time()))
        return arrivals

    async def all_streams():
        return await asyncio.gather(*(one(ids) for ids in prompts))

    arrivals = asyncio.run(all_streams())
    start = min(a[0] for a in arrivals)
    end = max(a[-1] for a in arrivals)
    tokens = sum(len(a) - 1 for a in arrivals)
    return tuple(tokens / (e - s) if e > s and tokens else float("nan") for s, e in zip(start, end))


def batching_table(models, *, max_batch=8, stream_counts=(1, 4, 8), max_tokens=64):
    """Rows (model, max_batch, streams, tok/s, ratio to 1 stream, tok/CPU-s, ratio to 1 stream)
    for each (name, checkpoint)."""
    from mlx_dsv4.server.engine import Engine

    rows = []
    for name, path in models:
        for batch in (max_batch, 1):
            engine = Engine(path, prompt_cache="off", max_batch=batch)
            engine.start()
            try:
                decode_rate(engine, 2, max_tokens=8)  # warm-up: compiled kernels, first allocations
                counts = stream_counts if batch > 1 else (4,)
                for streams in counts:
                    rate, cpu_rate = decode_rate(engine, streams, max_tokens=max_tokens)
                    if streams == 1:
                        base, cpu_base = rate, cpu_rate
                    else:
                        base, cpu_base = next(((r[3], r[5]) for r in rows if r[0] == name and r[2] == 1),
                                              (float("nan"), float("nan")))
                    rows.append((name, batch, streams, rate, rate / base, cpu_rate, cpu_rate / cpu_base))
            finally:
                engine.stop()
    return rows


def format_batching_table(rows):
    lines = [f"{'model':<15} {'max-batch':>9} {'streams':>7} {'tok/s':>7} {'vs 1':>6} {'tok/CPU-s':>9} {'vs 1':>6}",
             "-" * 65]
    for name, batch, streams, rate, ratio, cpu_rate, cpu_ratio in rows:
        lines.append(f"{name:<15} {batch:>9} {streams:>7} {rate:>7.1f} {ratio:>5.2f}x {cpu_rate:>9.1f} {cpu_ratio:>5.2f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default="none")
    p.add_argument("--tiny", action="store_true", help="start a server on a tiny random checkpoint")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=3)
    p.add_argument("--batching", action="store_true",
                   help="measure continuous batching on the tiny and the reduced-width model (in process)")
    p.add_argument("--max-batch", type=int, default=8, help="with --batching: the engine's max batch (default 8)")
    args = p.parse_args(argv)
    if args.batching:
        import platform

        import mlx.core as mx

        print(f"server_load --batching: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
              f"mlx {mx.__version__}, device {mx.default_device()}", flush=True)
        models = [("tiny", tiny_checkpoint()), ("reduced-width", reduced_width_checkpoint())]
        print(format_batching_table(batching_table(models, max_batch=args.max_batch)))
        return 0
    server = None
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_server_support import MODEL, ServerProcess

        server = ServerProcess(["--served-model-name", MODEL])
        args.base_url, args.model = server.base, MODEL
    elif not (args.base_url and args.model):
        p.error("give --base-url and --model, or --tiny")
    try:
        stats = run_load(args.base_url, args.model, api_key=args.api_key, clients=args.clients,
                         requests=args.requests, max_tokens=args.max_tokens)
    finally:
        if server is not None:
            server.stop()
    print(report(stats))
    for failure in stats["failures"]:
        print("lost:", failure)
    return 0 if not stats["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
