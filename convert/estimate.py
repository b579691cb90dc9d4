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
