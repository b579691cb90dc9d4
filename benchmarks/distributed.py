"""Decode speed, bytes exchanged and peak RSS per rank of distributed inference over loopback.

    python benchmarks/distributed.py [--ranks 1,2,3] [--modes pipeline,experts] [--tokens 32]

Builds (once, under --checkpoint-dir) the reduced-width model of docs/performance.md (hidden 256,
4 heads of 512, q_lora 64, 2x64 output, indexer 4x128 top-512, experts 2 of 4 x 128, vocab
8192, bfloat16) with the layer pattern 4,128 repeated (--layers), then for each rank count
launches `mlx.launch --backend ring -n N` on 127.0.0.1 and decodes --tokens greedy tokens after
a --prompt-token prefill. One rank is the plain single-process model.

Bytes per token are what each rank hands to send/all_sum per decoded token (the payload; a ring
all_sum moves about 2(n-1)/n times that over each link). In experts mode it also times one
MoE output's all_sum against an all_gather summed locally.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REDUCED = dict(hidden_size=256, num_attention_heads=4, head_dim=512, qk_rope_head_dim=64, q_lora_rank=64,
               o_groups=2, o_lora_rank=64, index_n_heads=4, index_head_dim=128, index_topk=512,
               sliding_window=128, moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2,
               vocab_size=8192, num_hash_layers=0)
LAUNCH = "from mlx._distributed_utils.launch import main; main()"


def peak_rss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def checkpoint(root: Path, layers, seed=0) -> Path:
    from mlx_dsv4.tiny import write_tiny_checkpoint

    out = root / ("dist-bench-" + "-".join(map(str, layers)))
    if not (out / "config.json").exists():
        write_tiny_checkpoint(out, preset="flash", seed=seed, dtype="bfloat16", mtp=False,
                              compress_ratios=list(layers), **REDUCED)
    return out


def time_collectives(ranks, dim, iters=200) -> dict:
    import mlx.core as mx

    x = mx.random.normal((1, 1, dim)).astype(mx.bfloat16)
    mx.eval(x)

    def run(fn):
        for _ in range(10):
            mx.eval(fn())
        t0 = time.perf_counter()
        for _ in range(iters):
            mx.eval(fn())
        return (time.perf_counter() - t0) / iters * 1e6

    return {"all_sum_us": run(lambda: mx.distributed.all_sum(x, group=ranks.group)),
            "all_gather_sum_us": run(lambda: mx.distributed.all_gather(x, group=ranks.group).sum(axis=0))}


def worker(args) -> None:
    import mlx.core as mx

    path, out = Path(args.checkpoint), Path(args.out)
    if args.mode == "single":
        from mlx_dsv4.loader import load_model

        model, ranks = load_model(path, check_memory=False), None
    else:
        from mlx_dsv4.distributed import init, load_distributed

        ranks = init()
        model = load_distributed(path, ranks, args.mode)
    rss_loaded = peak_rss()
    prompt = mx.random.randint(0, model.args.vocab_size, (1, args.prompt), key=mx.random.key(0))
    cache = model.make_cache()
    logits = model(prompt, cache=cache)
    token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
    mx.eval(token, cache.state())
    for _ in range(3):  # warm-up
        token = mx.argmax(model(token, cache=cache)[:, -1], axis=-1, keepdims=True)
        mx.eval(token)
    sent = ranks.payload_bytes if ranks else 0
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        token = mx.argmax(model(token, cache=cache)[:, -1], axis=-1, keepdims=True)
        mx.eval(token)
    ms = (time.perf_counter() - t0) / args.tokens * 1e3
    result = {"rank": ranks.rank if ranks else 0, "ms_per_token": ms,
              "bytes_per_token": ((ranks.payload_bytes - sent) / args.tokens) if ranks else 0,
              "rss_loaded": rss_loaded, "rss_peak": peak_rss()}
    if ranks is not None and args.mode == "experts":
        result["collectives"] = time_collectives(ranks, model.args.hidden_size)
    if ranks is not None and args.mode == "pipeline":
        result["layers"] = [model.first, model.end]
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result))


def launch(args, path, mode, n) -> list:
    from mlx_dsv4.distributed import free_ports

    out = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--checkpoint", str(path), "--out", str(out),
           "--mode", mode, "--tokens", str(args.tokens), "--prompt", str(args.prompt)]
    if n > 1:
        cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(n), "-p", str(free_ports(n)), "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(out.glob("rank*.json"))
    if len(files) != n:
        raise SystemExit(f"{mode} on {n} ranks failed:\n{proc.stdout}\n{proc.stderr}")
    return [json.loads(f.read_text()) for f in files]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,3")
    p.add_argument("--modes", default="pipeline,experts")
    p.add_argument("--layers", default="4,128,4,128", help="compress ratios of the layers")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens timed")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens prefilled first")
    p.add_argument("--checkpoint-dir", default=str(Path.home() / ".cache" / "mlx-dsv4" / "bench"))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    root = Path(args.checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = checkpoint(root, [int(x) for x in args.layers.split(",")])
    print(f"model: reduced widths (docs/performance.md), layers {args.layers}, bfloat16; "
          f"prompt {args.prompt} tokens, {args.tokens} decoded; ring backend over 127.0.0.1")
    print("| ranks | mode | ms/token | payload bytes/token per rank | peak RSS per rank (MB) |")
    print("|---:|---|---:|---|---|")
    results = []
    for n in [int(x) for x in args.ranks.split(",")]:
        for mode in (["single"] if n == 1 else args.modes.split(",")):
            per_rank = launch(args, path, mode, n)
            results.append({"ranks": n, "mode": mode, "per_rank": per_rank})
            ms = max(r["ms_per_token"] for r in per_rank)
            sent = ", ".join(f"{r['bytes_per_token']:.0f}" for r in per_rank)
            rss = ", ".join(f"{r['rss_peak'] / 1e6:.0f}" for r in per_rank)
            print(f"| {n} | {mode} | {ms:.2f} | {sent} | {rss} |", flush=True)
    for r in results:
        for rank in r["per_rank"]:
            if "collectives" in rank:
                c = rank["collectives"]
                print(f"experts, {r['ranks']} ranks, rank {rank['rank']}: one MoE output [1, 1, 256] bf16: "
                      f"all_sum {c['all_sum_us']:.0f} us, all_gather + local sum {c['all_gather_sum_us']:.0f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
