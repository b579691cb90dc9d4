"""`mlx-dsv4 bench`: long-context speed and memory, side by side with the baselines.

One process, one checkpoint, one prompt. For each context length it measures,
for every implementation in turn:

- ``ours``: this package with its default cache (FP8 kv rows, FP4 indexer keys),
- ``mlx-vlm``: mlx-vlm's DeepSeek-V4 language model loaded from the same
  official-layout weights (skipped, with the reason, when mlx-vlm is missing),
- ``naive``: this package's model with a BF16 cache that keeps every raw kv row
  and scores each step's queries in one dense block,

prefill throughput (chunked, as generation does it), decode throughput after
that prefill, peak memory, and cache bytes per token. It then prints the decode
roofline (weight bytes read per token over the measured memory bandwidth), our
figures as ratios to each baseline, and the long-context targets with PASS/FAIL.

The checkpoint has V4-Flash's per-layer dimensions by default (hidden 4096,
64x512 heads, q_lora 1024, 8x1024 grouped output, indexer 64x128 top-512,
ratios 4/128, window 128) with few layers and experts and a reduced vocabulary;
every dimension is a flag, so smaller runs fit slow machines.
"""

from __future__ import annotations

import gc
import hashlib
import json

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .sizes import format_bytes

# V4-Flash's per-layer dimensions (config.json keys) and what the benchmark shrinks.
FLASH_DIMS = {
    "hidden_size": 4096,
    "num_attention_heads": 64,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "sliding_window": 128,
    "moe_intermediate_size": 2048,
}
DEFAULT_RATIOS = "4,128"  # one CSA and one HCA layer: the two layer kinds whose cost grows with context
DEFAULT_CONTEXTS = "1024,8192,32768"
IMPLS = ("ours", "mlx-vlm", "naive")

# Long-context targets: decode speed at 8K, prefill growth from 1K to 32K; at 256K: prefill growth
# from 1K, peak transient against 32K's, decode speed against 8K's.
DECODE_CTX, SMALL_CTX, LARGE_CTX, LONGEST_CTX = 8192, 1024, 32768, 262144
TARGET_DECODE_VS_VLM = 1.5
TARGET_ROOFLINE = 0.5
TARGET_PREFILL_GROWTH = 1.5
TARGET_PREFILL_GROWTH_LONGEST = 2.5
TARGET_TRANSIENT_GROWTH = 1.2
TARGET_DECODE_KEPT = 0.5

MB = 1 << 20


# --------------------------------------------------------------------------- arguments


def parse_contexts(text: str) -> List[int]:
    """Context lengths from "1K,8K,32768" (see ``sizes.parse_token_counts``)."""
    from .sizes import parse_token_counts

    return parse_token_counts(text)


def parse_layers(text: str) -> List[int]:
    text = str(text).strip()
    if "," not in text and text.isdigit() and int(text) not in (0, 4, 128):
        n = int(text)
        return [4 if i % 2 == 0 else 128 for i in range(n)]
    ratios = [int(r) for r in text.split(",") if r.strip()]
    bad = [r for r in ratios if r not in (0, 4, 128)]
    if bad or not ratios:
        raise ValueError(f"--layers: compress ratios must be 0, 4 or 128, got {text!r}")
    return ratios


# --------------------------------------------------------------------------- checkpoint


def checkpoint_overrides(args) -> dict:
    ov = {key: getattr(args, key) for key in FLASH_DIMS}
    ov.update(
        compress_ratios=parse_layers(args.layers),
        n_routed_experts=args.experts,
        num_experts_per_tok=args.experts_per_token,
        vocab_size=args.vocab_size,
        num_hash_layers=0,  # score-routed, like most V4 layers
    )
    return ov


def shape_flags_given(args) -> List[str]:
    """The flags describing a built checkpoint's shape (those ``checkpoint_overrides`` reads) whose
    values differ from their defaults, as "--name"."""
    import argparse

    from .cli.bench import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    keys = list(FLASH_DIMS) + ["layers", "experts", "experts_per_token", "vocab_size"]
    return ["--" + key.replace("_", "-") for key in keys if getattr(args, key) != getattr(defaults, key)]


def ensure_checkpoint(args, log: Callable[[str], None], mtp: bool = False) -> Path:
    """The checkpoint to benchmark: --checkpoint, or one built from the flags (reused when present;
    ``mtp``: with an MTP layer)."""
    if args.checkpoint:
        return Path(args.checkpoint)
    from .tiny import write_tiny_checkpoint

    ov = checkpoint_overrides(args)
    dtype = args.dtype or "bfloat16"
    fields = {"ov": ov, "dtype": dtype, "seed": args.seed}
    if mtp:
        fields["mtp"] = True
    key = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = Path(args.checkpoint_dir or Path.home() / ".cache" / "mlx-dsv4" / "bench")
    out = root / f"v4bench-{digest}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        log(f"reusing checkpoint {out}")
        return out
    log(f"building checkpoint {out} ...")
    t0 = time.perf_counter()
    tmp = root / f".v4bench-{digest}.partial-{os.getpid()}"
    write_tiny_checkpoint(tmp, preset="flash", seed=args.seed, dtype=dtype, mtp=mtp, **ov)
    tmp.rename(out)
    log(f"built in {time.perf_counter() - t0:.0f}s")
    return out


# --------------------------------------------------------------------------- memory probes


def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssProbe:
    """Peak resident set size of a measured section, above the RSS at its start (Linux only)."""

    def __init__(self):
        self.available = os.path.exists("/proc/self/clear_refs") and _proc_status("VmHWM") is not None
        self.base = 0

    def start(self) -> None:
        if not self.available:
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.available = False
            return
        self.base = _proc_status("VmRSS") or 0

    def peak(self) -> Optional[int]:
        if not self.available:
            return None
        return max(0, (_proc_status("VmHWM") or 0) - self.base)


# --------------------------------------------------------------------------- implementations


class Runner:
    """One implementation: make a cache, feed it tokens, evaluate everything the step produced."""

    name = ""
    note = ""

    def make_cache(self):
        raise NotImplementedError

    def step(self, tokens, cache, logits: bool = True):
        raise NotImplementedError

    def evaluate(self, out, cache) -> None:
        raise NotImplementedError

    def cache_bytes(self, cache) -> int:
        raise NotImplementedError


class OursRunner(Runner):
    def __init__(self, model, name: str, kv_dtype: str, index_dtype: str, naive: bool = False):
        self.model, self.name = model, name
        self.kv_dtype, self.index_dtype, self.naive = kv_dtype, index_dtype, naive
        from .streams import parallel_streams

        n = len(parallel_streams())
        self.note = (f"{kv_dtype} kv, {index_dtype} indexer keys" if not naive
                     else "bf16 kv, all raw rows kept, dense per-step attention") + f", {n} CPU stream(s)"

    def make_cache(self):
        return self.model.make_cache(self.kv_dtype, self.index_dtype, naive=self.naive)

    def step(self, tokens, cache, logits: bool = True):
        return self.model(tokens, cache=cache, last_only=True)

    def evaluate(self, out, cache) -> None:
        import mlx.core as mx

        mx.eval(out, cache.state())

    def cache_bytes(self, cache) -> int:
        return cache.nbytes


class VlmRunner(Runner):
    name = "mlx-vlm"

    def __init__(self, path: Path):
        import mlx.core as mx
        from mlx_vlm.models.deepseek_v4.config import ModelConfig
        from mlx_vlm.models.deepseek_v4.language import LanguageModel

        from .loader import read_weights

        import mlx_vlm

        config = json.loads((Path(path) / "config.json").read_text())
        self.model = LanguageModel(ModelConfig.from_dict(config))
        weights = self.model.sanitize(read_weights(Path(path)))
        self.model.load_weights(list(weights.items()), strict=True)
        mx.eval(self.model.parameters())
        self.model.eval()
        self.note = f"mlx-vlm {getattr(mlx_vlm, '__version__', '?')}, its own caches"

    def make_cache(self):
        return self.model.make_cache()

    def step(self, tokens, cache, logits: bool = True):
        # Hidden streams, then the readout for the last position only (as our last_only does).
        h = self.model.model(tokens, cache=cache, skip_final_norm=True)
        return self.model.logits_from_hidden(h[:, -1:])

    def evaluate(self, out, cache) -> None:
        import mlx.core as mx

        mx.eval(out, [c.state for c in cache])

    def cache_bytes(self, cache) -> int:
        from mlx_vlm.models.cache import cache_nbytes

        return cache_nbytes(cache)


# --------------------------------------------------------------------------- measurement


@dataclass
class Result:
    impl: str
    context: int
    prefill_s: float = float("nan")
    prefill_tok_s: float = float("nan")
    last_chunk_ms_per_tok: float = float("nan")
    decode_tok_s: float = float("nan")
    decode_ms: float = float("nan")  # median step
    decode_mean_ms: float = float("nan")
    peak_bytes: int = 0  # MLX allocator peak above the memory held before the run (weights etc.)
    peak_transient_bytes: int = 0  # that peak beyond the cache the run ends with
    rss_peak_bytes: Optional[int] = None
    cache_bytes: int = 0
    cache_bytes_per_token: float = float("nan")
    skipped: Optional[str] = None
    error: Optional[str] = None


SHORT_PREFILL_S = 5.0  # prefills shorter than this are timed 3 times (median): one run is too noisy


def _prefill(runner: Runner, tokens, chunk: int):
    """(cache, last output, seconds, ms per token of the last chunk)."""
    cache = runner.make_cache()
    out = None
    t0 = last = time.perf_counter()
    last_chunk_ms = float("nan")
    for s in range(0, tokens.shape[1], chunk):
        piece = tokens[:, s : s + chunk]
        t_chunk = time.perf_counter()
        out = runner.step(piece, cache)
        runner.evaluate(out, cache)
        last = time.perf_counter()
        last_chunk_ms = 1e3 * (last - t_chunk) / piece.shape[1]
    return cache, out, last - t0, last_chunk_ms


def decode_step(runner: Runner, out, cache):
    """One greedy step; returns (its output, seconds)."""
    import mlx.core as mx

    t0 = time.perf_counter()
    nxt = mx.argmax(out[:, -1], axis=-1).astype(mx.int32)[:, None]
    out = runner.step(nxt, cache)
    runner.evaluate(out, cache)
    return out, time.perf_counter() - t0


def measure(runner: Runner, prompt: np.ndarray, context: int, chunk: int, rss: RssProbe):
    """Prefill `context` tokens and take one untimed decode step: (Result, cache, last output).

    Decode speed is timed afterwards by `paired_decode`, alternating the implementations.
    """
    import mlx.core as mx

    res = Result(runner.name, context)
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    rss.start()

    tokens = mx.array(prompt[None, :context].astype(np.int32))
    cache, out, seconds, res.last_chunk_ms_per_tok = _prefill(runner, tokens, chunk)
    if seconds < SHORT_PREFILL_S:
        times = [seconds]
        for _ in range(2):
            del cache, out
            cache, out, seconds, _ = _prefill(runner, tokens, chunk)
            times.append(seconds)
        seconds = float(np.median(times))
    res.prefill_s = seconds
    res.prefill_tok_s = context / res.prefill_s
    out, _ = decode_step(runner, out, cache)  # untimed: one-off shape compilations

    res.peak_bytes = max(0, mx.get_peak_memory() - base)
    res.rss_peak_bytes = rss.peak()
    res.cache_bytes = runner.cache_bytes(cache)
    res.peak_transient_bytes = max(0, res.peak_bytes - res.cache_bytes)
    res.cache_bytes_per_token = res.cache_bytes / (context + 1)
    return res, cache, out


def paired_decode(runners: Dict[str, Runner], states: Dict[str, list], results: Dict[str, Result],
                  steps: int) -> None:
    """Time `steps` decode steps per implementation, taking turns step by step (the order
    reversed every round), so that load from elsewhere on the machine hits all of them alike."""
    names = list(states)
    times = {name: [] for name in names}
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            out, cache = states[name]
            out, seconds = decode_step(runners[name], out, cache)
            states[name][0] = out
            times[name].append(seconds)
    for name in names:
        r = results[name]
        r.decode_ms = 1e3 * float(np.median(times[name]))
        r.decode_mean_ms = 1e3 * float(np.mean(times[name]))
        r.decode_tok_s = 1e3 / r.decode_ms


def warm_up(runner: Runner, prompt: np.ndarray, chunk: int) -> None:
    """Compile and allocate once, outside the timings: one prefill chunk and two decode steps."""
    import mlx.core as mx

    cache = runner.make_cache()
    n = min(chunk, 512, len(prompt))
    out = runner.step(mx.array(prompt[None, :n].astype(np.int32)), cache)
    runner.evaluate(out, cache)
    for _ in range(2):
        out = runner.step(mx.argmax(out[:, -1], axis=-1).astype(mx.int32)[:, None], cache)
        runner.evaluate(out, cache)


def best_seconds(fn, runs: int = 5) -> float:
    """Fastest of `runs` timed calls of fn, after one untimed call."""
    fn()
    t = float("inf")
    for _ in range(runs):
        s = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - s)
    return t


def measure_bandwidth(size_mb: int, dtype) -> dict:
    """Read bandwidth, bytes/s: best of a full reduction over a large array and of a
    matrix-vector product over a large weight matrix in the model's dtype."""
    import mlx.core as mx

    from .streams import on, parallel_streams

    n = max(1, size_mb * MB // 4)
    a = mx.random.normal((n,))
    mx.eval(a)
    sum_bw = a.nbytes / best_seconds(lambda: mx.eval(a.sum()))
    # the same reduction split over one stream per core (what the model's own split work can reach)
    streams = parallel_streams()
    pieces = [a[i * n // len(streams) : (i + 1) * n // len(streams)] for i in range(len(streams))]

    def split_sum():
        sums = []
        for stream, piece in zip(streams, pieces):
            with on(stream):
                sums.append(piece.sum())
        mx.eval(sums)

    sum_bw = max(sum_bw, a.nbytes / best_seconds(split_sum))
    del a, pieces
    cols = 4096
    rows = max(1, size_mb * MB // (cols * dtype.size))
    w = mx.random.normal((rows, cols)).astype(dtype)
    x = mx.random.normal((1, cols)).astype(dtype)
    mx.eval(w, x)
    gemv_bw = w.nbytes / best_seconds(lambda: mx.eval(x @ w.T))
    del w, x
    gc.collect()
    mx.clear_cache()
    return {"sum_bytes_per_s": sum_bw, "gemv_bytes_per_s": gemv_bw, "bytes_per_s": max(sum_bw, gemv_bw)}


def decode_weight_bytes(model) -> dict:
    """Bytes of weights one decode token reads: every parameter, except that routed experts
    count only the active ones and the embedding (and hash table) only one row."""
    from mlx.utils import tree_flatten

    a = model.args
    total = active = 0
    for name, p in tree_flatten(model.parameters()):
        nbytes = p.nbytes
        total += nbytes
        if ".ffn.experts." in name:
            active += nbytes * a.num_experts_per_tok / a.n_routed_experts
        elif name.startswith("embed.") and a.tie_word_embeddings:
            active += nbytes * (1 + 1 / a.vocab_size)  # a row, and the whole as the head
        elif name.startswith("embed.") or name.endswith("tid2eid"):
            active += nbytes / a.vocab_size
        else:
            active += nbytes
    return {"total_weight_bytes": total, "decode_weight_bytes": int(active)}


def naive_score_bytes(args, context: int, chunk: int, itemsize: int) -> int:
    """Size of the naive baseline's largest dense score block: all heads x one chunk's
    queries x every earlier key (attention in the activation dtype, indexer in float32)."""
    q = min(chunk, context)
    attn = args.num_attention_heads * q * context * itemsize
    index = args.index_n_heads * q * (context // 4) * 4 if 4 in args.compress_ratios else 0
    return max(attn, index)


# --------------------------------------------------------------------------- report


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else format_bytes(n, digits=2)


def _ratio(a, b) -> float:
    if a is None or b is None or not (a == a and b == b) or b == 0:  # nan checks
        return float("nan")
    return a / b


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def _pick(results: Dict, impl: str, ctx: int) -> Optional[Result]:
    r = results.get((impl, ctx))
    return r if r is not None and r.skipped is None and r.error is None else None


def prefill_growth(results: Dict, impl: str, ctx: int, base: int = SMALL_CTX) -> float:
    """Prefill time per token at `ctx` over that at `base` tokens (nan when either is missing)."""
    a, b = _pick(results, impl, base), _pick(results, impl, ctx)
    return _ratio(a.prefill_tok_s, b.prefill_tok_s) if a and b else float("nan")


def long_context_figures(results: Dict) -> dict:
    """Our figures the 256K targets read: prefill growth from 1K, peak transient against 32K's,
    decode speed against 8K's (nan where a context was not measured)."""
    longest, large, decode = (_pick(results, "ours", c) for c in (LONGEST_CTX, LARGE_CTX, DECODE_CTX))
    return {
        "prefill_growth_longest": prefill_growth(results, "ours", LONGEST_CTX),
        "transient_growth": _ratio(longest.peak_transient_bytes, large.peak_transient_bytes)
        if longest and large else float("nan"),
        "decode_kept": _ratio(longest.decode_tok_s, decode.decode_tok_s) if longest and decode else float("nan"),
    }


def report(summary: dict, results: Dict, contexts: List[int], impls: List[str], out=print) -> dict:
    """Print the tables and the targets; return the target verdicts."""
    out("")
    out(f"{'impl':<8} {'context':>8} {'prefill tok/s':>14} {'per tok vs 1K':>14} {'last chunk ms/tok':>18} "
        f"{'decode tok/s':>13} {'decode ms':>10} {'peak (MLX)':>11} {'transient':>11} {'peak (RSS)':>11} "
        f"{'cache B/tok':>12}")
    for ctx in contexts:
        for impl in impls:
            r = results.get((impl, ctx))
            if r is None:
                continue
            if r.skipped or r.error:
                out(f"{impl:<8} {ctx:>8}  {'skipped: ' + r.skipped if r.skipped else 'error: ' + r.error}")
                continue
            out(f"{impl:<8} {ctx:>8} {r.prefill_tok_s:>14.1f} {_fmt(prefill_growth(results, impl, ctx)):>13}x "
                f"{r.last_chunk_ms_per_tok:>18.2f} {r.decode_tok_s:>13.2f} {r.decode_ms:>10.1f} "
                f"{_fmt_bytes(r.peak_bytes):>11} {_fmt_bytes(r.peak_transient_bytes):>11} "
                f"{_fmt_bytes(r.rss_peak_bytes):>11} {r.cache_bytes_per_token:>12.1f}")

    bw = summary["bandwidth"]
    wb = summary["weights"]
    roof = bw["bytes_per_s"] / wb["decode_weight_bytes"]
    summary["roofline_tok_s"] = roof
    out("")
    out(f"memory bandwidth: {bw['bytes_per_s'] / 1e9:.2f} GB/s (best of: array sum, on one stream or split over "
        f"one per core, {bw['sum_bytes_per_s'] / 1e9:.2f} GB/s; {summary['dtype']} matrix-vector "
        f"{bw['gemv_bytes_per_s'] / 1e9:.2f} GB/s)")
    out(f"weights read per decode token: {_fmt_bytes(wb['decode_weight_bytes'])} "
        f"(of {_fmt_bytes(wb['total_weight_bytes'])}; active experts only)")
    out(f"decode roofline: {roof:.2f} tok/s")
    for ctx in contexts:
        r = _pick(results, "ours", ctx)
        if r:
            out(f"  ours at {ctx:>6}: {r.decode_tok_s:.2f} tok/s = {100 * r.decode_tok_s / roof:.1f}% of roofline")

    out("")
    out("ours as ratios (speed: ours/baseline, higher is better; memory: ours/baseline, lower is better)")
    out(f"{'baseline':<8} {'context':>8} {'prefill':>9} {'decode':>9} {'peak mem':>9} {'cache B/tok':>12}")
    for base in [i for i in impls if i != "ours"]:
        for ctx in contexts:
            o, b = _pick(results, "ours", ctx), _pick(results, base, ctx)
            if not (o and b):
                continue
            out(f"{base:<8} {ctx:>8} {_fmt(_ratio(o.prefill_tok_s, b.prefill_tok_s)):>8}x "
                f"{_fmt(_ratio(o.decode_tok_s, b.decode_tok_s)):>8}x {_fmt(_ratio(o.peak_bytes, b.peak_bytes)):>8}x "
                f"{_fmt(_ratio(o.cache_bytes_per_token, b.cache_bytes_per_token)):>11}x")

    # Targets, at their contexts when measured (otherwise the nearest stand-ins, labelled).
    dctx = DECODE_CTX if DECODE_CTX in contexts else contexts[len(contexts) // 2]
    sctx = SMALL_CTX if SMALL_CTX in contexts else contexts[0]
    lctx = LARGE_CTX if LARGE_CTX in contexts else contexts[-1]
    verdicts = {}

    def verdict(name, value, ok, text):
        state = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        verdicts[name] = {"value": value, "pass": ok, "text": text}
        out(f"  [{state}] {text}")

    out("")
    out("targets" + ("" if (dctx, sctx, lctx) == (DECODE_CTX, SMALL_CTX, LARGE_CTX)
                                else f"  -- measured at contexts {sctx}/{dctx}/{lctx} instead of 1024/8192/32768"))
    o, v = _pick(results, "ours", dctx), _pick(results, "mlx-vlm", dctx)
    x = _ratio(o.decode_tok_s, v.decode_tok_s) if o and v else float("nan")
    verdict("decode_vs_mlx_vlm", x, None if x != x else x >= TARGET_DECODE_VS_VLM,
            f"decode at {dctx}: {_fmt(x)}x mlx-vlm (target >= {TARGET_DECODE_VS_VLM}x)")
    x = o.decode_tok_s / roof if o else float("nan")
    verdict("decode_roofline", x, None if x != x else x >= TARGET_ROOFLINE,
            f"decode at {dctx}: {_fmt(100 * x, '.1f')}% of roofline (target >= {100 * TARGET_ROOFLINE:.0f}%)")
    a, b = _pick(results, "ours", sctx), _pick(results, "ours", lctx)
    x = _ratio(a.prefill_tok_s, b.prefill_tok_s) if a and b and lctx != sctx else float("nan")
    verdict("prefill_growth", x, None if x != x else x <= TARGET_PREFILL_GROWTH,
            f"prefill time per token at {lctx} / at {sctx}: {_fmt(x)}x (target <= {TARGET_PREFILL_GROWTH}x)")
    o, v = _pick(results, "ours", lctx), _pick(results, "mlx-vlm", lctx)
    x = _ratio(o.peak_bytes, v.peak_bytes) if o and v else float("nan")
    verdict("peak_memory_vs_mlx_vlm", x, None if x != x else x < 1.0,
            f"peak memory at {lctx}: ours {_fmt_bytes(o.peak_bytes) if o else '-'} vs mlx-vlm "
            f"{_fmt_bytes(v.peak_bytes) if v else '-'} = {_fmt(x)}x (target < 1x)")
    figures = long_context_figures(results)
    x = figures["prefill_growth_longest"]
    verdict("prefill_growth_longest", x, None if x != x else x <= TARGET_PREFILL_GROWTH_LONGEST,
            f"prefill time per token at {LONGEST_CTX} / at {SMALL_CTX}: {_fmt(x)}x "
            f"(target <= {TARGET_PREFILL_GROWTH_LONGEST}x)")
    x = figures["transient_growth"]
    verdict("transient_growth", x, None if x != x else x <= TARGET_TRANSIENT_GROWTH,
            f"peak transient at {LONGEST_CTX} / at {LARGE_CTX}: {_fmt(x)}x (target <= {TARGET_TRANSIENT_GROWTH}x)")
    x = figures["decode_kept"]
    verdict("decode_kept", x, None if x != x else x >= TARGET_DECODE_KEPT,
            f"decode tok/s at {LONGEST_CTX} / at {DECODE_CTX}: {_fmt(x)}x (target >= {TARGET_DECODE_KEPT}x)")
    return verdicts


def plot(summary: dict, path) -> None:
    """A PNG of the run: prefill and decode tok/s, and peak transient and cache bytes, against
    the context (log scale), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["results"] if r.get("skipped") is None and r.get("error") is None]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl in impls:
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["context"])
        ctx = [r["context"] for r in mine]
        speed.plot(ctx, [r["prefill_tok_s"] for r in mine], "o-", label=f"{impl} prefill")
        speed.plot(ctx, [r["decode_tok_s"] for r in mine], "s--", label=f"{impl} decode")
        memory.plot(ctx, [r["peak_transient_bytes"] / MB for r in mine], "o-", label=f"{impl} peak transient")
        memory.plot(ctx, [r["cache_bytes"] / MB for r in mine], "s--", label=f"{impl} cache")
    for ax, label in ((speed, "tokens / s"), (memory, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    speed.set_title("speed")
    memory.set_title("memory beyond the weights")
    fig.suptitle(f"mlx-dsv4 bench: {summary.get('machine', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- driver


def run_benchmark(args, log: Callable[[str], None] = print) -> dict:
    """Measure and report as the flags of `mlx-dsv4 bench` say; returns the summary (JSON-able)."""
    from .streams import cpu_stream_limit

    with cpu_stream_limit(args.cpu_streams):
        return _run_benchmark(args, log)


def _run_benchmark(args, log: Callable[[str], None]) -> dict:
    import mlx.core as mx

    from .config import ModelArgs
    from .loader import load_model

    contexts = parse_contexts(args.contexts or DEFAULT_CONTEXTS)
    if args.decode_steps is None:
        args.decode_steps = 16
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"--impls: unknown implementation(s) {unknown}; expected some of {IMPLS}")
    if "ours" not in impls:
        impls.insert(0, "ours")

    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401 - checked before the run, not after it
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'mlx-dsv4[bench]'") from None
    path = ensure_checkpoint(args, log)
    model_args = ModelArgs.from_path(path)
    log(f"checkpoint {path}: {model_args.num_hidden_layers} layers, ratios {model_args.compress_ratios}, "
        f"hidden {model_args.hidden_size}, heads {model_args.num_attention_heads}x{model_args.head_dim}, "
        f"experts {model_args.num_experts_per_tok}/{model_args.n_routed_experts}, vocab {model_args.vocab_size}")

    model = load_model(path)
    dtype = model.dtype
    runners: Dict[str, Runner] = {"ours": OursRunner(model, "ours", args.kv_dtype, args.index_dtype)}
    skipped_impls: Dict[str, str] = {}
    if "naive" in impls:
        runners["naive"] = OursRunner(model, "naive", "bf16", "bf16", naive=True)
    if "mlx-vlm" in impls:
        try:
            runners["mlx-vlm"] = VlmRunner(path)
        except ImportError as e:
            skipped_impls["mlx-vlm"] = f"mlx-vlm is not installed ({e}); pip install 'mlx-dsv4[bench]'"
        except Exception as e:  # report exactly what fails and carry on with the other baseline
            skipped_impls["mlx-vlm"] = f"cannot load the checkpoint: {type(e).__name__}: {e}"
    for name, why in skipped_impls.items():
        log(f"{name}: skipped: {why}")
    order = [i for i in impls if i in runners]

    rng = np.random.default_rng(args.seed + 1)
    prompt = rng.integers(0, model_args.vocab_size, size=max(contexts) + 1).astype(np.int32)

    summary = {
        "command": "mlx-dsv4 bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
        "checkpoint": str(path),
        "config": {k: getattr(model_args, k) for k in list(FLASH_DIMS) + [
            "compress_ratios", "n_routed_experts", "num_experts_per_tok", "vocab_size", "num_hidden_layers"]},
        "dtype": str(dtype).replace("mlx.core.", ""),
        "contexts": contexts,
        "chunk": args.chunk,
        "decode_steps": args.decode_steps,
        "impls": {name: runners[name].note for name in order},
        "skipped_impls": skipped_impls,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"mlx {mx.__version__}, device {mx.default_device()}",
        "memory_measure": "peak (MLX) = mx.get_peak_memory() during the run minus mx.get_active_memory() "
                          "before it (weights excluded); peak (RSS) = VmHWM above VmRSS at the start",
    }
    log(f"machine: {summary['machine']}")
    log("measuring memory bandwidth ...")
    summary["bandwidth"] = measure_bandwidth(args.bandwidth_mb, dtype)
    summary["weights"] = decode_weight_bytes(model)

    if "mlx-vlm" in runners:
        summary["agreement"] = agreement(runners["ours"], runners["mlx-vlm"], prompt, log)

    for name in order:
        log(f"warming up {name} ...")
        t0 = time.perf_counter()
        warm_up(runners[name], prompt, args.chunk)
        log(f"warmed up {name} in {time.perf_counter() - t0:.1f}s")

    rss = RssProbe()
    results: Dict = {}
    for ctx in contexts:
        states: Dict[str, list] = {}
        for name in order:
            vlm_max = getattr(args, "vlm_max_context", None)
            if name == "mlx-vlm" and vlm_max is not None and ctx > vlm_max:
                why = f"context above --vlm-max-context {vlm_max}"
                results[(name, ctx)] = Result(name, ctx, skipped=why)
                log(f"{name:<8} {ctx:>7}: skipped: {why}")
                continue
            if name == "naive":
                need = naive_score_bytes(model_args, ctx, args.chunk, 4)
                why = None
                if args.naive_max_context is not None and ctx > args.naive_max_context:
                    why = f"context above --naive-max-context {args.naive_max_context}"
                elif need > args.naive_max_gb * (1 << 30):
                    why = f"dense score block of {_fmt_bytes(need)} exceeds --naive-max-gb {args.naive_max_gb:g}"
                if why:
                    results[(name, ctx)] = Result(name, ctx, skipped=why)
                    log(f"{name:<8} {ctx:>7}: skipped: {why}")
                    continue
            log(f"{name:<8} {ctx:>7}: prefill ...")
            try:
                r, cache, out = measure(runners[name], prompt, ctx, args.chunk, rss)
                states[name] = [out, cache]
            except Exception as e:  # one implementation failing must not hide the others' figures
                r = Result(name, ctx, error=f"{type(e).__name__}: {e}")
            results[(name, ctx)] = r
            if r.error:
                log(f"{name:<8} {ctx:>7}: error: {r.error}")
            else:
                log(f"{name:<8} {ctx:>7}: prefill {r.prefill_tok_s:.1f} tok/s ({r.prefill_s:.1f}s), "
                    f"peak {_fmt_bytes(r.peak_bytes)}, cache {r.cache_bytes_per_token:.1f} B/tok")
        if args.decode_steps > 0 and states:
            log(f"decode at {ctx}: {args.decode_steps} steps each, {', '.join(states)} taking turns ...")
            try:
                paired_decode(runners, states, {n: results[(n, ctx)] for n in states}, args.decode_steps)
            except Exception as e:
                for n in states:
                    results[(n, ctx)].error = f"decode: {type(e).__name__}: {e}"
            for n in states:
                log(f"{n:<8} {ctx:>7}: decode {results[(n, ctx)].decode_tok_s:.2f} tok/s")
        del states
        gc.collect()

    log("")
    log("=" * 100)
    log(f"mlx-dsv4 bench: {summary['machine']}")
    c = summary["config"]
    log(f"model: {c['num_hidden_layers']} layers (ratios {c['compress_ratios']}), hidden {c['hidden_size']}, "
        f"heads {c['num_attention_heads']}x{c['head_dim']} (rope {c['qk_rope_head_dim']}), q_lora {c['q_lora_rank']}, "
        f"out {c['o_groups']}x{c['o_lora_rank']}, indexer {c['index_n_heads']}x{c['index_head_dim']} "
        f"top-{c['index_topk']}, window {c['sliding_window']}, experts {c['num_experts_per_tok']}/{c['n_routed_experts']}"
        f" x {c['moe_intermediate_size']}, vocab {c['vocab_size']}, {summary['dtype']} weights")
    log(f"prefill in chunks of {args.chunk} (median of 3 runs when one takes under {SHORT_PREFILL_S:g}s); decode: "
        f"median of {args.decode_steps} timed steps after one untimed step, implementations taking turns")
    for name in order:
        log(f"  {name}: {runners[name].note}")
    for name, why in skipped_impls.items():
        log(f"  {name}: skipped: {why}")
    if "agreement" in summary:
        ag = summary["agreement"]
        log(f"same weights check: ours (float cache) vs mlx-vlm logits over {ag['tokens']} tokens: "
            f"max |diff| {ag['max_abs_diff']:.3g} (logit scale {ag['max_abs']:.3g}), "
            f"argmax agreement {100 * ag['argmax_agree']:.0f}%")
    log(summary["memory_measure"])
    verdicts = report(summary, results, contexts, order, out=log)
    summary["results"] = [asdict(r) for r in results.values()]
    summary["targets"] = verdicts
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        log(f"wrote {args.json_out}")
    if getattr(args, "plot", None):
        plot(summary, args.plot)
        log(f"wrote {args.plot}")
    return summary


def agreement(ours: Runner, vlm: Runner, prompt: np.ndarray, log, n: int = 256) -> dict:
    """Both implementations read the same weights: compare their logits on a short prompt."""
    import mlx.core as mx

    n = min(n, len(prompt))
    tokens = mx.array(prompt[None, :n].astype(np.int32))
    a = ours.model(tokens, cache=ours.model.make_cache("float", "float")).astype(mx.float32)
    h = vlm.model.model(tokens, cache=vlm.model.make_cache(), skip_final_norm=True)
    b = vlm.model.logits_from_hidden(h).astype(mx.float32)
    out = {
        "tokens": n,
        "max_abs_diff": mx.abs(a - b).max().item(),
        "max_abs": mx.abs(a).max().item(),
        "argmax_agree": (a.argmax(-1) == b.argmax(-1)).astype(mx.float32).mean().item(),
    }
    del a, b, h
    return out
