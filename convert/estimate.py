"""Output size and unified-memory estimates, from a checkpoint's plan or from a config alone."""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import PREFILL_CHUNK, kv_bytes, prefill_transient_bytes
from ..config import ModelArgs
from ..sizes import format_decimal_bytes
from .plan import model_args, plan_units, sources_from_config
from .recipes import Recipe

RUNTIME_OVERHEAD = 1 * 10**9  # MLX buffers, tokenizer: a rough fixed allowance
GB = 10**9


@dataclass
class Estimate:
    recipe: str
    model_bytes: int
    mtp_bytes: int
    in_bytes: int
    context: int
    kv_bytes: int
    transient_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        return self.model_bytes + self.kv_bytes + self.transient_bytes + RUNTIME_OVERHEAD

    def lines(self) -> list[str]:
        return [
            f"recipe: {self.recipe}",
            f"output size: {format_decimal_bytes(self.model_bytes)} model"
            + (f" + {format_decimal_bytes(self.mtp_bytes)} MTP" if self.mtp_bytes else "")
            + f" (source {format_decimal_bytes(self.in_bytes)})",
            f"estimated unified memory to run: {self.memory_bytes / GB:.1f} GB "
            f"(weights {self.model_bytes / GB:.1f} + FP8 KV cache at {self.context} tokens "
            f"{self.kv_bytes / GB:.2f} + prefill transient ({PREFILL_CHUNK}-token chunks) "
            f"{self.transient_bytes / GB:.2f} + runtime {RUNTIME_OVERHEAD / GB:.0f})",
        ]


def estimate_units(units, args: ModelArgs, recipe: Recipe, context: int) -> Estimate:
    """Sizes of the planned output; memory counts the default decoding cache (FP8 kv, FP4 indexer keys)
    and the peak transient of the last prefill chunk before `context` tokens."""
    chunk = min(PREFILL_CHUNK, context)
    return Estimate(recipe.describe(),
                    sum(u.nbytes for u in units if u.group == "model"),
                    sum(u.nbytes for u in units if u.group == "mtp"),
                    sum(u.in_bytes for u in units), context, kv_bytes(args, context),
                    prefill_transient_bytes(args, chunk, context - chunk))


def estimate_config(cfg: dict, recipe: Recipe, context: int, include_mtp: bool = True) -> Estimate:
    args = model_args(cfg)
    units = plan_units(sources_from_config(args, include_mtp), args,
                       lambda m, fam, kind, k: recipe.decide(fam, kind, k), recipe.float_dtype, include_mtp)
    return estimate_units(units, args, recipe, context)


TABLE_RECIPES = [
    ("native", dict(name="native")),
    ("q8", dict(name="q8")),
    ("q6", dict(name="q6")),
    ("q4", dict(name="q4")),
    ("q3", dict(name="q3")),
    ("q3 --dense-bits native", dict(name="q3", dense_bits="native")),
    ("q2", dict(name="q2")),
    ("q2 --group-size 128", dict(name="q2", group_size=128)),
    ("q2 --dense-bits native", dict(name="q2", dense_bits="native")),
    ("none --dtype bfloat16", dict(name="none", dtype="bfloat16")),
]


def size_table(cfg: dict, contexts=(32768, 1048576)) -> str:
    rows = ["| recipe | model GB | MTP GB | " + " | ".join(f"memory GB @ {c // 1024}K" for c in contexts) + " |",
            "|---|---:|---:|" + "---:|" * len(contexts)]
    for label, kw in TABLE_RECIPES:
        ests = [estimate_config(cfg, Recipe(**kw), c) for c in contexts]
        e = ests[0]
        rows.append(f"| `--recipe {label}` | {e.model_bytes / GB:.1f} | {e.mtp_bytes / GB:.1f} | "
                    + " | ".join(f"{x.memory_bytes / GB:.1f}" for x in ests) + " |")
    return "\n".join(rows)


# -- several machines (mlx_dsv4.distributed) -------------------------------------------------


@dataclass
class RankShare:
    part: str  # the layers or routed experts of this rank
    weights: int
    kv_bytes: int
    transient_bytes: int

    @property
    def memory_bytes(self) -> int:
        return self.weights + self.kv_bytes + self.transient_bytes + RUNTIME_OVERHEAD


def _model_units(cfg: dict, recipe: Recipe):
    args = model_args(cfg)
    units = plan_units(sources_from_config(args, False), args,
                       lambda m, fam, kind, k: recipe.decide(fam, kind, k), recipe.float_dtype, False)
    return args, [u for u in units if u.group == "model"]


def rank_shares(cfg: dict, recipe: Recipe, context: int, ranks: int) -> dict:
    """mode -> [RankShare per rank] for `--distributed pipeline` and `experts` over `ranks` ranks
    (without MTP layers, which distributed runs do not load): the layer split and expert split
    the loader makes, each rank's cache (pipeline: its layers'; experts: all) and prefill peak."""
    import re
    from dataclasses import replace

    from ..sharding import expert_range, pipeline_extras, split_layers

    args, units = _model_units(cfg, recipe)
    chunk = min(PREFILL_CHUNK, context)
    layer_re = re.compile(r"^layers\.(\d+)\.")
    per_layer = [0] * args.num_hidden_layers
    embed = head = experts = 0
    for u in units:
        m = layer_re.match(u.name)
        if m:
            per_layer[int(m[1])] += u.nbytes
            if u.family == "expert":
                experts += u.nbytes
        elif u.family == "embed":
            embed += u.nbytes
        else:
            head += u.nbytes
    embed, head = pipeline_extras(embed, head, args.tie_word_embeddings)
    pipeline, first = [], 0
    for r, count in enumerate(split_layers(per_layer, ranks, embed, head)):
        ratios = args.compress_ratios[first:first + count]
        sub = replace(args, compress_ratios=list(ratios), num_hidden_layers=count)
        weights = sum(per_layer[first:first + count]) + (embed if r == 0 else 0) + (head if r == ranks - 1 else 0)
        pipeline.append(RankShare(f"layers {first}-{first + count - 1}", weights, kv_bytes(sub, context),
                                  prefill_transient_bytes(sub, chunk, context - chunk)))
        first += count
    shared = sum(per_layer) + embed + head - experts
    kv, transient = kv_bytes(args, context), prefill_transient_bytes(args, chunk, context - chunk)
    by_experts = []
    for r in range(ranks):
        a, b = expert_range(args.n_routed_experts, r, ranks)
        by_experts.append(RankShare(f"experts {a}-{b - 1}", shared + experts * (b - a) // args.n_routed_experts,
                                    kv, transient))
    return {"pipeline": pipeline, "experts": by_experts}


def rank_lines(cfg: dict, recipe: Recipe, context: int, ranks: int) -> list[str]:
    lines = [f"over {ranks} ranks (mlx.launch ... --distributed MODE; no MTP layers), unified memory per rank "
             f"at {context} tokens (weights + cache + prefill transient + runtime {RUNTIME_OVERHEAD / GB:.0f} GB):"]
    for mode, shares in rank_shares(cfg, recipe, context, ranks).items():
        parts = "; ".join(f"rank {r} ({s.part}): {s.memory_bytes / GB:.1f} GB (weights {s.weights / GB:.1f})"
                          for r, s in enumerate(shares))
        lines.append(f"  {mode}: {parts}")
    return lines


def rank_table(cfg: dict, ranks: int, context: int = 32768) -> str:
    """Per recipe: the largest rank's memory in each mode over `ranks` ranks."""
    rows = [f"| recipe | single machine GB | pipeline, largest of {ranks} ranks GB | "
            f"experts, largest of {ranks} ranks GB |", "|---|---:|---:|---:|"]
    for label, kw in TABLE_RECIPES:
        recipe = Recipe(**kw)
        single = estimate_config(cfg, recipe, context, include_mtp=False).memory_bytes
        shares = rank_shares(cfg, recipe, context, ranks)
        rows.append(f"| `--recipe {label}` | {single / GB:.1f} | "
                    + " | ".join(f"{max(s.memory_bytes for s in shares[m]) / GB:.1f}" for m in ("pipeline", "experts"))
                    + " |")
    return "\n".join(rows)
