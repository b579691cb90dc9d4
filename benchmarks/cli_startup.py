"""Wall time of `mlx-dsv4 --help`: this tree against a baseline revision, side by side.

    python benchmarks/cli_startup.py [--baseline cd189c7] [--runs 7] [--argv "--help"]

The baseline is extracted with `git archive` into a temporary directory and not installed:
each run is a fresh Python process whose bootstrap registers `mlx_dsv4` from a tree's
`mlx_dsv4/` folder and `mlx_dsv4.convert` from its `convert/` folder, then calls
`mlx_dsv4.cli.main(argv)`. This tree is run the same way, and the two take turns, so
both see the same machine load. Reports each tree's median and best wall time, the ratio,
and which of torch, transformers and mlx_lm the process imported.
"""

import argparse
import io
import json
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "mlx_lm")

BOOTSTRAP = """
import importlib.util, json, sys

def register(name, folder):
    spec = importlib.util.spec_from_file_location(name, f"{folder}/__init__.py", submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

tree, argv, heavy = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
package = register("mlx_dsv4", f"{tree}/mlx_dsv4")
package.convert = register("mlx_dsv4.convert", f"{tree}/convert")
from mlx_dsv4.cli import main
try:
    main(argv)
except SystemExit:
    pass
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(heavy))
print("HEAVY " + json.dumps(loaded), file=sys.stderr)
"""


def extract(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return into


def run_once(tree: Path, argv: list) -> tuple:
    """(seconds, heavy packages imported) of one process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BOOTSTRAP, str(tree), json.dumps(argv), json.dumps(HEAVY)],
                          capture_output=True, text=True, cwd=tree)
    seconds = time.perf_counter() - start
    marker = [line for line in done.stderr.splitlines() if line.startswith("HEAVY ")]
    if done.returncode != 0 or not marker:
        raise RuntimeError(f"{tree}: mlx-dsv4 {shlex.join(argv)} failed:\n{done.stderr}")
    return seconds, json.loads(marker[-1][len("HEAVY "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="cd189c7", help="git revision to compare with (default cd189c7)")
    p.add_argument("--runs", type=int, default=7, help="runs of each tree, taking turns (default 7)")
    p.add_argument("--argv", default="--help", help="mlx-dsv4 arguments to time (default --help)")
    args = p.parse_args(argv)
    command = shlex.split(args.argv)

    with tempfile.TemporaryDirectory(prefix="mlx-dsv4-baseline-") as tmp:
        trees = {f"baseline {args.baseline}": extract(args.baseline, Path(tmp)), "this tree": ROOT}
        times = {name: [] for name in trees}
        heavy = {}
        for name, tree in trees.items():
            run_once(tree, command)  # warm the file cache and bytecode caches
        for i in range(args.runs):
            for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
                seconds, heavy[name] = run_once(trees[name], command)
                times[name].append(seconds)

    print(f"mlx-dsv4 {shlex.join(command)}: {args.runs} runs per tree, taking turns; {sys.executable}")
    print(f"{'tree':<20} {'median s':>9} {'best s':>8}  imported")
    for name in trees:
        print(f"{name:<20} {statistics.median(times[name]):>9.3f} {min(times[name]):>8.3f}  "
              f"{', '.join(heavy[name]) or 'none of ' + ', '.join(HEAVY)}")
    base, this = (statistics.median(times[name]) for name in trees)
    print(f"ratio (baseline / this tree, medians): {base / this:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
