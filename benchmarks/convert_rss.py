"""Peak resident memory of `mlx-dsv4 convert` on a multi-shard release-layout checkpoint.

Builds a checkpoint of random FP8/FP4 codes (official names, tiny-model structure with wide
experts), converts it in a child process, and prints the child's peak RSS above the RSS of
the same process right after importing the converter (on Linux the import's transient
peak is cleared first, so only the conversion's own high-water mark counts).

    python benchmarks/convert_rss.py [--recipe native] [--shards 6] [--experts 64] [--inter 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import PRELUDE  # noqa: E402

CHILD = r"""
from mlx_dsv4.convert.convert import convert
from mlx_dsv4.convert.recipes import Recipe
""" + PRELUDE + r"""
src, out, recipe = sys.argv[1:4]
convert(src, out, Recipe(recipe, group_size=32), shard_gb=0.03, progress=False, log=lambda s: None)
print(json.dumps({"baseline": base, "peak": peak()}))
"""


def write_random_release(out: Path, shards: int, experts: int, inter: int, hidden: int) -> Path:
    from convert_fixtures import FP4_RULES, FP8_RULES, RELEASE_QUANT, tiny_cfg, write_shards
    from mlx_dsv4 import spec
    from mlx_dsv4.config import ModelArgs

    rng = np.random.default_rng(0)
    cfg = tiny_cfg(vocab_size=256, n_routed_experts=experts, moe_intermediate_size=inter, hidden_size=hidden)
    # every tensor of the checkpoint contract, filled with random codes instead of floats
    shapes = spec.official_tensors(ModelArgs.from_dict(cfg), mtp=False)
    stored = {}
    for name, shape in shapes.items():
        base = name[: -len(".weight")]
        if FP4_RULES.search(name):
            n, k = shape
            stored[name] = (rng.integers(-128, 128, (n, k // 2), dtype=np.int8), "I8")
            stored[base + ".scale"] = (rng.integers(118, 127, (n, k // 32)).astype(np.uint8), "F8_E8M0")
        elif FP8_RULES.search(name):
            n, k = shape
            codes = rng.integers(0, 0x7E, shape).astype(np.uint8)
            stored[name] = (codes, "F8_E4M3")
            stored[base + ".scale"] = (rng.integers(118, 127, (-(-n // 128), -(-k // 128))).astype(np.uint8),
                                       "F8_E8M0")
        elif name.endswith("tid2eid"):
            stored[name] = (rng.integers(0, experts, shape).astype(np.int32), "I32")
        else:
            stored[name] = (rng.normal(0, 0.05, shape).astype(np.float32), "F32" if "norm" in name else "BF16")
    out.mkdir(parents=True, exist_ok=True)
    write_shards(out, stored, shards)
    (out / "config.json").write_text(json.dumps(dict(cfg, quantization_config=RELEASE_QUANT, expert_dtype="fp4")))
    return out


def measure(recipe="native", shards=6, experts=64, inter=512, hidden=256, workdir=None) -> dict:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src = write_random_release(Path(tmp) / "src", shards, experts, inter, hidden)
        largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in src.glob("*.safetensors"))

        r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "out"), recipe],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        base, peak = got["baseline"], got["peak"]
    return {"recipe": recipe, "source_bytes": total, "largest_shard": largest, "baseline_rss": base,
            "peak_rss": peak, "peak_above_baseline": peak - base}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="native")
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    a = p.parse_args()
    r = measure(a.recipe, a.shards, a.experts, a.inter, a.hidden)
    mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    print(f"recipe {r['recipe']}: source {mb(r['source_bytes'])} in {a.shards} shards, largest {mb(r['largest_shard'])}")
    print(f"peak RSS {mb(r['peak_rss'])}; after-import baseline {mb(r['baseline_rss'])}; "
          f"conversion adds {mb(r['peak_above_baseline'])} "
          f"= {r['peak_above_baseline'] / r['largest_shard']:.2f} x largest shard")


if __name__ == "__main__":
    main()
