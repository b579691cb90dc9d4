"""Loading maps the safetensors lazily and never holds two copies of the weights."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import load_rss  # noqa: E402


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    # about 155 MiB: 6 layers of 32 experts of 3 x 256 x 512 bfloat16 weights
    return load_rss.measure(hidden=256, inter=512, experts=32, vocab=4096, workdir=tmp_path_factory.mktemp("rss"))


def test_converted_checkpoint_loads_within_its_bytes_plus_ten_percent(measured):
    r = measured["converted"]
    print(f"\nconverted: load adds {r['peak_above_baseline'] / 2**20:.1f} MiB for "
          f"{r['checkpoint_bytes'] / 2**20:.1f} MiB of weights ({r['ratio']:.2f} x)")
    assert r["checkpoint_bytes"] > 100 * 2**20
    assert r["mlx_active"] >= 0.95 * r["checkpoint_bytes"]  # the weights were really read
    assert r["ratio"] <= 1.10


def test_official_layout_adds_at_most_one_layer_of_stacked_experts(measured):
    """Per-expert tensors are stacked while loading: about one layer's routed experts come on top."""
    r = measured["official"]
    one_layer_of_experts = 32 * 3 * 256 * 512 * 2
    print(f"\nofficial: load adds {r['peak_above_baseline'] / 2**20:.1f} MiB for "
          f"{r['checkpoint_bytes'] / 2**20:.1f} MiB of weights ({r['ratio']:.2f} x)")
    assert r["peak_above_baseline"] <= 1.10 * r["checkpoint_bytes"] + one_layer_of_experts
