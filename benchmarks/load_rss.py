"""Peak resident memory of `mlx_dsv4.load_model` against the checkpoint's bytes.

Writes a random tiny-structure checkpoint with wide experts (`make-tiny` weights, bfloat16),
converts it to the MLX layout (`--recipe none`: stacked experts, float weights), then loads
each layout in a child process and prints the child's peak RSS above its RSS right after
importing the loader (on Linux the import's transient peak is cleared first).

    python benchmarks/load_rss.py [--hidden 512] [--inter 1024] [--experts 96] [--dir /tmp]

The defaults make a checkpoint of about 2 GB; the written files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import PRELUDE  # noqa: E402

CHILD = r"""
import mlx.core as mx
from mlx_dsv4.loader import load_model
""" + PRELUDE + r"""
model = load_model(sys.argv[1])
print(json.dumps({"baseline": base, "peak": peak(), "active": mx.get_active_memory()}))
"""


def write_checkpoints(root: Path, hidden: int, inter: int, experts: int, vocab: int) -> tuple[Path, Path]:
    """(official float layout, converted MLX layout) directories under ``root``."""
    from mlx_dsv4.convert.convert import convert
    from mlx_dsv4.convert.recipes import Recipe
    from mlx_dsv4.tiny import write_tiny_checkpoint

    official = write_tiny_checkpoint(root / "official", dtype="bfloat16", mtp=False, hidden_size=hidden,
                                     moe_intermediate_size=inter, n_routed_experts=experts, vocab_size=vocab)
    converted = root / "converted"
    convert(official, converted, Recipe("none", dtype="bfloat16"), progress=False, log=lambda s: None)
    return official, converted


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors") if not p.name.startswith("mtp"))


def measure_load(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    size = weight_bytes(path)
    return {"checkpoint_bytes": size, "baseline_rss": got["baseline"], "peak_rss": got["peak"],
            "peak_above_baseline": got["peak"] - got["baseline"], "mlx_active": got["active"],
            "ratio": (got["peak"] - got["baseline"]) / size}


def measure(hidden=512, inter=1024, experts=96, vocab=4096, workdir=None, layouts=("converted", "official")) -> dict:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        official, converted = write_checkpoints(Path(tmp), hidden, inter, experts, vocab)
        paths = {"converted": converted, "official": official}
        return {layout: measure_load(paths[layout]) for layout in layouts}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--experts", type=int, default=96)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dir", default=None, help="where to write the temporary checkpoints")
    a = p.parse_args()
    mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    for layout, r in measure(a.hidden, a.inter, a.experts, a.vocab, a.dir).items():
        print(f"{layout}: checkpoint {mb(r['checkpoint_bytes'])}; load peak RSS {mb(r['peak_rss'])} "
              f"(after-import baseline {mb(r['baseline_rss'])}); load adds {mb(r['peak_above_baseline'])} "
              f"= {r['ratio']:.2f} x checkpoint bytes")


if __name__ == "__main__":
    main()
