"""Live figures of a model at work, one set for the server's /metrics, ``mlx-dsv4 top``, chat's
/stats and ``generate --stats``.

- KV cache by layer type (window-only, CSA ratio 4, HCA ratio 128): bytes, window rows and
  compressed entries held after a sequence of N tokens (the arithmetic of ``memory``);
- prefill and decode speed, prompt-cache hits and bytes, queue depth (server);
- expert routing: tokens each routed expert received per layer, and the imbalance max / mean
  (``RoutingCounter``, opt-in: the MoE layers call it only when it is attached);
- active parameters per token and estimated FLOPs per token at a context length;
- tool-call latency by substrate (the agent loop) and draft acceptance (``--draft``).
"""

import threading
import time
from typing import Dict, Iterator, List, Optional

import numpy as np

from .config import ModelArgs
from .memory import layer_kv_bytes
from .spec import compressor_width, expert_parts, mix_width, official_tensors
from .sizes import format_bytes

LAYER_TYPES = {0: "window", 4: "csa", 128: "hca"}  # compress ratio -> layer type
LAYER_TYPE_TITLES = {"window": "window-only", "csa": "CSA (ratio 4)", "hca": "HCA (ratio 128)"}
PROMETHEUS_PREFIX = "mlx_dsv4"


# -- what the config says ------------------------------------------------------------

def kv_cache_by_type(args: ModelArgs, tokens: int, kv_dtype: str = "fp8", index_dtype: str = "fp4",
                     dtype="bfloat16") -> Dict[str, dict]:
    """Per layer type present in the model: its layers, the bytes of KV cache they hold after
    ``tokens`` tokens, and the window rows and compressed entries in it (summed over its layers)."""
    out = {}
    for ratio in args.compress_ratios:
        kind = out.setdefault(LAYER_TYPES[ratio], {"layers": 0, "bytes": 0, "window_rows": 0,
                                                   "compressed_entries": 0})
        kind["layers"] += 1
        kind["bytes"] += layer_kv_bytes(args, ratio, tokens, kv_dtype, index_dtype, dtype)
        kind["window_rows"] += min(max(tokens, 0), args.sliding_window)
        kind["compressed_entries"] += max(tokens, 0) // ratio if ratio else 0
    return out


def active_parameters(args: ModelArgs) -> int:
    """Weights one token goes through in the decoder: every tensor but the routed experts not
    picked (num_experts_per_tok of n_routed_experts per layer); the embedding and the hash
    layers' token-to-expert tables count one row (a tied head reads the embedding whole)."""
    total = 0
    for name, shape in official_tensors(args, mtp=False).items():
        parts = expert_parts(name)
        if parts is not None and parts[1] >= args.num_experts_per_tok:
            continue
        if name == "embed.weight" or name.endswith(".ffn.gate.tid2eid"):
            total += shape[1] + (int(np.prod(shape)) if name == "embed.weight" and args.tie_word_embeddings else 0)
            continue
        total += int(np.prod(shape))
    return total


def flops_per_token(args: ModelArgs, context: int) -> int:
    """Estimated FLOPs (2 per multiply-add) of one token that sees ``context`` tokens (itself
    included, so at position ``context`` - 1): the
    projections, the mHC mixes, attention over its window and the compressed entries it
    attends to (HCA: every closed one; CSA: the indexer's top-k, after the indexer scored
    them all), the router, the active and shared experts, and the output head."""
    D, H, hd = args.hidden_size, args.num_attention_heads, args.head_dim
    q, o, G = args.q_lora_rank, args.o_lora_rank, args.o_groups
    hc, I, E, k = args.hc_mult, args.moe_intermediate_size, args.n_routed_experts, args.num_experts_per_tok
    context = max(context, 1)
    macs = 0
    for ratio in args.compress_ratios:
        macs += D * q + q * H * hd + D * hd + H * hd * o + G * o * D  # wq_a, wq_b, wkv, wo_a, wo_b
        macs += 2 * mix_width(args) * hc * D  # mHC mixes of the attention and the MoE
        attended = min(context, args.sliding_window)
        if ratio:
            macs += 2 * D * compressor_width(ratio, hd)  # compressor wkv, wgate
        if ratio == 4:
            ih, ihd = args.index_n_heads, args.index_head_dim
            entries = context // 4
            macs += q * ih * ihd + D * ih + 2 * D * compressor_width(4, ihd)  # indexer projections
            macs += ih * ihd * entries  # indexer scores over every closed entry
            attended += min(args.index_topk, entries)
        elif ratio:
            attended += context // ratio
        macs += 2 * H * hd * attended  # scores and weighted values
        macs += D * E + (k + args.n_shared_experts) * 3 * D * I  # router, experts
    macs += hc * hc * D + D * args.vocab_size  # mHC head, output head
    return 2 * macs


# -- expert routing ------------------------------------------------------------------

class RoutingCounter:
    """Tokens routed to each expert of each decoder layer, counted from the router's choices.

    ``attach(model)`` sets it on the model's MoE layers, which then hand it their expert
    indices on every forward pass. The indices stay lazy until the pass that made them is
    done: a pass is folded into the counts when the next one starts, or by ``fold``.
    """

    def __init__(self, n_layers: int, n_experts: int):
        self._counts = np.zeros((n_layers, n_experts), dtype=np.int64)
        self._passes: List[list] = []  # per forward pass: [(layer_id, indices), ...]
        self._last_layer = None
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, model) -> "RoutingCounter":
        counter = cls(model.args.num_hidden_layers, model.args.n_routed_experts)
        for layer in model.layers:
            ffn = getattr(layer, "ffn", None)
            if ffn is not None:
                ffn.routing_counter = counter
        return counter

    @staticmethod
    def detach(model) -> None:
        for layer in model.layers:
            ffn = getattr(layer, "ffn", None)
            if ffn is not None:
                ffn.routing_counter = None

    def __call__(self, layer_id: int, indices) -> None:
        if layer_id >= self._counts.shape[0]:
            return
        if not self._passes or layer_id < self._last_layer:
            self.fold(keep_latest=False)  # a new pass: the ones before it are evaluated
            self._passes.append([])
        self._last_layer = layer_id
        self._passes[-1].append((layer_id, indices))

    def fold(self, keep_latest: bool = True) -> None:
        """Add the recorded passes to the counts; ``keep_latest`` leaves the newest one, which
        may still be running, for later. Call it on the thread that runs the model."""
        done = self._passes[:-1] if keep_latest else self._passes
        if not done:
            return
        added = np.zeros_like(self._counts)
        for records in done:
            for layer_id, indices in records:
                np.add.at(added[layer_id], np.asarray(indices).reshape(-1), 1)
        self._passes = self._passes[len(done):]
        with self._lock:
            self._counts += added

    def discard_pending(self) -> None:
        """Forget the passes not counted yet (those of a generation that failed or was stopped)."""
        self._passes = []
        self._last_layer = None

    def counts(self) -> np.ndarray:
        """[layers, experts] tokens routed so far (folded passes only); safe from any thread."""
        with self._lock:
            return self._counts.copy()


def routing_figures(counts: np.ndarray) -> List[dict]:
    """Per layer that routed any token: tokens per expert and the imbalance max / mean."""
    out = []
    for layer, row in enumerate(np.asarray(counts)):
        total = int(row.sum())
        if total:
            out.append({"layer": layer, "tokens": [int(v) for v in row],
                        "imbalance": round(float(row.max()) / (total / len(row)), 4)})
    return out


# -- tool calls ----------------------------------------------------------------------

class ToolLatency:
    """Tool calls by substrate: how many, their total and longest time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_substrate: Dict[str, dict] = {}

    def observe(self, substrate: Optional[str], seconds: float) -> None:
        with self._lock:
            entry = self._by_substrate.setdefault(substrate or "none", {"calls": 0, "seconds": 0.0, "max_s": 0.0})
            entry["calls"] += 1
            entry["seconds"] += seconds
            entry["max_s"] = max(entry["max_s"], seconds)

    def figures(self) -> Dict[str, dict]:
        with self._lock:
            return {name: dict(entry) for name, entry in sorted(self._by_substrate.items())}


TOOL_CALLS = ToolLatency()  # the agent loops of this process record their tool calls here


# -- the figures of a generation -----------------------------------------------------

def _draft(proposed: int, accepted: int) -> Optional[dict]:
    if not proposed:
        return None
    return {"proposed": proposed, "accepted": accepted, "acceptance_rate": round(accepted / proposed, 4)}


def sequence_tokens(step) -> int:
    """Tokens whose kv a generation's cache holds after ``step``: the prompt and every sampled
    token but the newest, which has not been through the model yet."""
    return step.prompt_tokens + max(step.generation_tokens - 1, 0)


def generation_figures(model, step, routing: Optional[RoutingCounter] = None, prompt_cache=None) -> dict:
    """The figures after ``step`` (a GenerationStep) of a generation with ``model``: its
    sequence's KV cache by layer type, speeds, active parameters and FLOPs per token at its
    length, and when given, the expert routing counted and the prompt cache's hits and bytes."""
    args = model.args
    tokens = sequence_tokens(step)
    kv_dtype, index_dtype = model.cache_dtypes
    figures = {
        "context_tokens": tokens,
        "kv_cache": kv_cache_by_type(args, tokens, kv_dtype, index_dtype, model.dtype),
        "prefill_tokens_per_s": round(step.prompt_tps, 3),
        "decode_tokens_per_s": round(step.generation_tps, 3),
        "active_parameters": active_parameters(args),
        "flops_per_token": flops_per_token(args, tokens + 1),
        "experts": None,
        "prompt_cache": None,
        "tool_calls": TOOL_CALLS.figures(),
        "draft": _draft(step.draft_proposed, step.draft_accepted),
    }
    if routing is not None:
        routing.fold(keep_latest=False)
        figures["experts"] = routing_figures(routing.counts())
    store = getattr(prompt_cache, "store", prompt_cache)
    if store is not None and hasattr(store, "stats"):
        stats = store.stats()
        figures["prompt_cache"] = {key: stats[key] for key in ("hits", "misses", "memory_bytes", "disk_bytes")}
    return figures


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_figures(figures: dict) -> List[str]:
    """The figures as lines of text for a terminal."""
    lines = [f"context: {figures['context_tokens']} tokens in the KV cache | active parameters "
             f"{_count(figures['active_parameters'])} | {_count(figures['flops_per_token'])}FLOP for the next token"]
    lines.append(f"speed: prefill {figures['prefill_tokens_per_s']:.1f} tok/s | "
                 f"decode {figures['decode_tokens_per_s']:.1f} tok/s")
    if figures.get("queue_depth") is not None:
        lines.append(f"queue: {figures['queue_depth']} waiting")
    for kind, kv in figures["kv_cache"].items():
        lines.append(f"KV cache {LAYER_TYPE_TITLES.get(kind, kind)}: {format_bytes(kv['bytes'])} in {kv['layers']} "
                     f"layer(s), {kv['window_rows']} window rows, {kv['compressed_entries']} compressed entries")
    store = figures.get("prompt_cache")
    if store:
        lines.append(f"prompt cache: {store['hits']} hits, {store['misses']} misses, "
                     f"{format_bytes(store['memory_bytes'])} in memory, {format_bytes(store['disk_bytes'])} on disk")
    for layer in figures.get("experts") or ():
        tokens = layer["tokens"]
        busiest = int(np.argmax(tokens))
        lines.append(f"experts layer {layer['layer']}: imbalance {layer['imbalance']:.2f} (max/mean), "
                     f"busiest expert {busiest} with {tokens[busiest]} of {sum(tokens)} routed tokens")
    for substrate, calls in (figures.get("tool_calls") or {}).items():
        mean = calls["seconds"] / calls["calls"] if calls["calls"] else 0.0
        longest = f", max {calls['max_s'] * 1000:.1f} ms" if calls.get("max_s") else ""
        lines.append(f"tool calls ({substrate}): {calls['calls']}, mean {mean * 1000:.1f} ms{longest}")
    draft = figures.get("draft")
    if draft:
        lines.append(f"draft: {draft['accepted']} of {draft['proposed']} proposed tokens accepted "
                     f"({100 * draft['acceptance_rate']:.1f}%)")
    return lines


# -- the server ----------------------------------------------------------------------

class ServerMetrics:
    """A serving engine's generation figures, fed on its engine thread by ``watch`` and read
    from request threads by ``snapshot``."""

    def __init__(self):
        self._lock = threading.Lock()
        self.model = None
        self.routing: Optional[RoutingCounter] = None
        self.totals = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                       "draft_proposed": 0, "draft_accepted": 0}
        self.latest = None  # the newest step of the running (or last) generation
        self._active = (None, 0)  # (model, its active parameters): counting them walks every tensor

    def active_parameters(self, model) -> int:
        if self._active[0] is not model:
            self._active = (model, active_parameters(model.args))
        return self._active[1]

    def watch(self, model, steps) -> Iterator:
        """``steps`` (a stream_generate iterator) unchanged, their figures noted on the way."""
        self.begin(model)
        last = None
        try:
            for step in steps:
                last = step
                self.note_step(step)
                yield step
        except BaseException:
            self.discard_pending()
            raise
        finally:
            steps.close()
            self.note_end(last)

    def begin(self, model) -> None:
        """Before a generation of ``model`` starts (counts the router's choices from then on)."""
        if self.model is not model:
            self.model = model
            self.routing = RoutingCounter.attach(model)

    def note_step(self, step, *, evaluated: bool = False) -> None:
        """A step of a running generation; ``evaluated``: every forward pass so far is done."""
        self.routing.fold(keep_latest=not evaluated)
        with self._lock:
            self.latest = step

    def discard_pending(self) -> None:
        """Forget the router's choices not counted yet: a failed pass cannot be evaluated, and a
        stopped one need not be waited for."""
        if self.routing is not None:
            self.routing.discard_pending()

    def note_end(self, last) -> None:
        """A generation ended; ``last`` its last step (None when it gave none)."""
        self.routing.fold(keep_latest=False)
        if last is None:
            return
        with self._lock:
            for key, value in (("prompt_tokens", last.prompt_tokens), ("cached_tokens", last.cached_tokens),
                               ("generated_tokens", last.generation_tokens),
                               ("draft_proposed", last.draft_proposed),
                               ("draft_accepted", last.draft_accepted)):
                self.totals[key] += value

    def snapshot(self) -> dict:
        with self._lock:
            return {"latest": self.latest, "totals": dict(self.totals),
                    "expert_tokens": self.routing.counts() if self.routing is not None else None}


def prometheus_text(engine, model_name: str) -> bytes:
    """The server's figures in the Prometheus text format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

    stats = engine.stats()
    seen = engine.metrics.snapshot()
    model = engine.model if stats["loaded"] else None
    latest = seen["latest"]
    p = PROMETHEUS_PREFIX
    families = []

    def gauge(name, doc, value=None, labels=(), samples=()):
        family = GaugeMetricFamily(f"{p}_{name}", doc, value=value, labels=list(labels) or None)
        for label_values, v in samples:
            family.add_metric(label_values, v)
        families.append(family)

    def counter(name, doc, value=None, labels=(), samples=()):
        family = CounterMetricFamily(f"{p}_{name}", doc, value=value, labels=list(labels) or None)
        for label_values, v in samples:
            family.add_metric(label_values, v)
        families.append(family)

    gauge("info", "The served model (value 1).", labels=["model"], samples=[([model_name], 1)])
    gauge("loaded", "1 once the model is loaded.", value=int(stats["loaded"]))
    gauge("queue_depth", "Requests waiting for the engine.", value=max(0, stats["pending"] - int(stats["active"])))
    gauge("active_generations", "Generations running now.", value=int(stats["active"]))
    counter("requests", "Finished generations by outcome.", labels=["outcome"],
            samples=[([k], stats[k]) for k in ("completed", "cancelled", "failed")])
    totals = seen["totals"]
    counter("prompt_tokens", "Prompt tokens of finished generations.", value=totals["prompt_tokens"])
    counter("cached_prompt_tokens", "Prompt tokens restored from the prompt cache.", value=totals["cached_tokens"])
    counter("generated_tokens", "Tokens generated by finished generations.", value=totals["generated_tokens"])
    counter("draft_proposed_tokens", "Tokens the drafter proposed (speculative decoding).",
            value=totals["draft_proposed"])
    counter("draft_accepted_tokens", "Proposed tokens the model accepted.", value=totals["draft_accepted"])
    gauge("prefill_tokens_per_second", "Prefill speed of the latest generation.",
          value=latest.prompt_tps if latest else 0.0)
    gauge("decode_tokens_per_second", "Decoding speed of the latest generation.",
          value=latest.generation_tps if latest else 0.0)
    tokens = sequence_tokens(latest) if latest else 0
    gauge("context_tokens", "Tokens the KV cache of the latest generation holds.", value=tokens)
    store = stats.get("prompt_cache")
    counter("prompt_cache_hits", "Prompts that reused a cached prefix.", value=store["hits"] if store else 0)
    counter("prompt_cache_misses", "Prompts that found no cached prefix.", value=store["misses"] if store else 0)
    gauge("prompt_cache_snapshots", "Prefix snapshots kept.", value=store["snapshots"] if store else 0)
    gauge("prompt_cache_bytes", "Bytes of prefix snapshots.", labels=["store"],
          samples=[(["memory"], store["memory_bytes"] if store else 0),
                   (["disk"], store["disk_bytes"] if store else 0)])
    gauge("memory_active_bytes", "MLX memory in use.", value=stats["memory"]["active_bytes"])
    gauge("rss_bytes", "Resident memory of the server process.", value=stats["memory"]["rss_bytes"])
    if model is not None:
        args = model.args
        kv = kv_cache_by_type(args, tokens, *model.cache_dtypes, model.dtype)
        gauge("kv_cache_bytes", "KV cache of the latest generation's sequence, by layer type.",
              labels=["layer_type"], samples=[([t], v["bytes"]) for t, v in kv.items()])
        gauge("kv_cache_window_rows", "Raw kv rows held in the sliding windows, by layer type.",
              labels=["layer_type"], samples=[([t], v["window_rows"]) for t, v in kv.items()])
        gauge("kv_cache_compressed_entries", "Compressed kv entries held, by layer type.",
              labels=["layer_type"], samples=[([t], v["compressed_entries"]) for t, v in kv.items()])
        gauge("kv_cache_layers", "Decoder layers of each layer type.",
              labels=["layer_type"], samples=[([t], v["layers"]) for t, v in kv.items()])
        gauge("active_parameters", "Parameters one token goes through.",
              value=engine.metrics.active_parameters(model))
        gauge("flops_per_token", "Estimated FLOPs of the latest sequence's next token.",
              value=flops_per_token(args, tokens + 1))
    counts = seen["expert_tokens"]
    if counts is not None:
        routed = [(layer, row) for layer, row in enumerate(counts) if row.sum()]
        counter("expert_tokens", "Tokens routed to each expert, by decoder layer.", labels=["layer", "expert"],
                samples=[([str(layer), str(e)], int(v)) for layer, row in routed for e, v in enumerate(row)])
        gauge("expert_imbalance", "Tokens of the busiest expert over the mean, by decoder layer.", labels=["layer"],
              samples=[([str(f["layer"])], f["imbalance"]) for f in routing_figures(counts)])
    calls = SummaryMetricFamily(f"{p}_tool_call_seconds", "Tool-call latency by execution substrate.",
                                labels=["substrate"])
    for substrate, entry in TOOL_CALLS.figures().items():
        calls.add_metric([substrate], entry["calls"], entry["seconds"])
    families.append(calls)

    class Collector:
        def collect(self):
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)


def figures_from_prometheus(text: str) -> dict:
    """The figures (as ``generation_figures`` gives them, plus the server's) from /metrics text;
    ValueError when it holds no mlx-dsv4 figures."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: Dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    if f"{PROMETHEUS_PREFIX}_info" not in samples:
        raise ValueError(f"no {PROMETHEUS_PREFIX}_info metric: not an mlx-dsv4 server")

    def one(name, default=0):
        values = samples.get(f"{PROMETHEUS_PREFIX}_{name}")
        return values[0][1] if values else default

    def by(name, label):
        return {labels[label]: value for labels, value in samples.get(f"{PROMETHEUS_PREFIX}_{name}", [])}

    kv = {}
    for kind, n in by("kv_cache_layers", "layer_type").items():
        kv[kind] = {"layers": int(n), "bytes": int(by("kv_cache_bytes", "layer_type").get(kind, 0)),
                    "window_rows": int(by("kv_cache_window_rows", "layer_type").get(kind, 0)),
                    "compressed_entries": int(by("kv_cache_compressed_entries", "layer_type").get(kind, 0))}
    expert_rows: Dict[int, Dict[int, int]] = {}
    for labels, value in samples.get(f"{PROMETHEUS_PREFIX}_expert_tokens_total", []):
        expert_rows.setdefault(int(labels["layer"]), {})[int(labels["expert"])] = int(value)
    experts = []
    for layer, row in sorted(expert_rows.items()):
        tokens = [row.get(e, 0) for e in range(max(row) + 1)]
        total = sum(tokens)
        experts.append({"layer": layer, "tokens": tokens,
                        "imbalance": round(max(tokens) / (total / len(tokens)), 4) if total else 0.0})
    tool_calls = {}
    for labels, value in samples.get(f"{PROMETHEUS_PREFIX}_tool_call_seconds_count", []):
        tool_calls[labels["substrate"]] = {"calls": int(value), "seconds": 0.0, "max_s": 0.0}
    for labels, value in samples.get(f"{PROMETHEUS_PREFIX}_tool_call_seconds_sum", []):
        tool_calls.setdefault(labels["substrate"], {"calls": 0, "seconds": 0.0, "max_s": 0.0})["seconds"] = value
    proposed, accepted = int(one("draft_proposed_tokens_total")), int(one("draft_accepted_tokens_total"))
    return {
        "model": samples[f"{PROMETHEUS_PREFIX}_info"][0][0].get("model"),
        "context_tokens": int(one("context_tokens")),
        "kv_cache": kv,
        "prefill_tokens_per_s": one("prefill_tokens_per_second"),
        "decode_tokens_per_s": one("decode_tokens_per_second"),
        "active_parameters": int(one("active_parameters")),
        "flops_per_token": int(one("flops_per_token")),
        "queue_depth": int(one("queue_depth")),
        "active_generations": int(one("active_generations")),
        "requests": {k: int(v) for k, v in by("requests_total", "outcome").items()},
        "generated_tokens": int(one("generated_tokens_total")),
        "prompt_tokens": int(one("prompt_tokens_total")),
        "experts": experts,
        "prompt_cache": {"hits": int(one("prompt_cache_hits_total")), "misses": int(one("prompt_cache_misses_total")),
                         "memory_bytes": int(by("prompt_cache_bytes", "store").get("memory", 0)),
                         "disk_bytes": int(by("prompt_cache_bytes", "store").get("disk", 0))},
        "tool_calls": tool_calls,
        "draft": _draft(proposed, accepted),
        "read_at": time.time(),
    }
