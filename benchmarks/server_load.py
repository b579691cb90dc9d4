"""Load test of `mlx-dsv4 serve`: concurrent streaming clients through the official openai client.

Each of ``--clients`` threads sends ``--requests`` streaming chat completions one after
another; the script prints requests/s and p50/p95 request latency (send to [DONE]) and
the server's memory before and after (from /health).

    python benchmarks/server_load.py --base-url http://127.0.0.1:8080 --model NAME [--api-key KEY]
    python benchmarks/server_load.py --tiny    # starts a server on a tiny random checkpoint
"""

import argparse
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default="none")
    p.add_argument("--tiny", action="store_true", help="start a server on a tiny random checkpoint")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=3)
    args = p.parse_args(argv)
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
