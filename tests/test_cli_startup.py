"""Start-up: help, estimates, make-tiny, `import mlx_dsv4` and loading a model import neither
torch, transformers nor mlx-lm's package (whose __init__ imports transformers); help and
estimates do not even import MLX."""

import json
import os
import subprocess
import sys

import pytest

from mlx_dsv4.cli import SUBCOMMANDS

HEAVY = ("torch", "transformers", "mlx_lm")
WITH_MLX = HEAVY + ("mlx",)

# Runs CODE, then reports the heavy top-level packages in sys.modules as the process exits.
PROBE = """
import atexit, json, os, sys

def report():
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(os.environ["HEAVY"])))
    with open(os.environ["REPORT"], "w") as f:
        json.dump(loaded, f)

atexit.register(report)
"""

RUN_CLI = "from mlx_dsv4.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def heavy_imports(tmp_path, code, *argv, watch=HEAVY):
    report = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    env = dict(os.environ, HEAVY=json.dumps(watch), REPORT=str(report))
    run = subprocess.run([sys.executable, "-c", PROBE + code, *argv], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(report.read_text()), run.stdout


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS],
                         ids=lambda argv: " ".join(argv))
def test_help(tmp_path, argv):
    loaded, out = heavy_imports(tmp_path, RUN_CLI, *argv, watch=WITH_MLX)
    assert out.startswith("usage: mlx-dsv4")
    assert loaded == []


def test_estimate_only(tmp_path):
    loaded, out = heavy_imports(tmp_path, RUN_CLI, "convert", "--estimate-only", "--preset", "flash", watch=WITH_MLX)
    assert "estimated unified memory" in out
    assert loaded == []


def test_make_tiny_then_import_and_load(tmp_path):
    loaded, out = heavy_imports(tmp_path, RUN_CLI, "make-tiny", str(tmp_path / "tiny"))
    assert "wrote tiny DeepSeek-V4 checkpoint" in out
    assert loaded == []
    load = "import mlx_dsv4\nmodel, tokenizer = mlx_dsv4.load(sys.argv[1])\nprint(model.args.num_hidden_layers)\n"
    loaded, out = heavy_imports(tmp_path, load, str(tmp_path / "tiny"))
    assert out.strip() == "6"
    assert loaded == []


def test_mlx_lm_modules_are_mlx_lm_files(tmp_path):
    """Without mlx_lm imported, mlx-lm's own files load under a private name; with it imported,
    mlx-lm's modules are used as they are, so classes keep their identity."""
    check = """
import importlib.util, inspect
from pathlib import Path
from mlx_dsv4 import generate, layers
mlx_lm_dir = Path(importlib.util.find_spec("mlx_lm").origin).parent
assert Path(inspect.getfile(layers.SwitchLinear)) == mlx_lm_dir / "models" / "switch_layers.py"
assert Path(inspect.getfile(generate.make_sampler)) == mlx_lm_dir / "sample_utils.py"
assert layers.SwitchLinear.__module__ == "mlx_dsv4._mlx_lm.models.switch_layers"
"""
    loaded, _ = heavy_imports(tmp_path, check)
    assert loaded == []
    same = """
import mlx_lm.models.switch_layers, mlx_lm.sample_utils
from mlx_dsv4 import generate, layers
assert layers.SwitchLinear is mlx_lm.models.switch_layers.SwitchLinear
assert generate.make_sampler is mlx_lm.sample_utils.make_sampler
"""
    loaded, _ = heavy_imports(tmp_path, same)
    assert "mlx_lm" in loaded
