"""End-to-end conversion of release-layout fixtures: layout, exactness, recipes, resume, hub."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert_fixtures import dequantized, official_view, read_dir, same_tensors, write_release_checkpoint
from mlx_dsv4.cli import main as cli
from mlx_dsv4.convert import estimate, transform
from mlx_dsv4.convert.convert import convert
from mlx_dsv4.convert.errors import ConvertError
from mlx_dsv4.convert.recipes import Recipe


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d, decoded, cfg = write_release_checkpoint(tmp_path_factory.mktemp("rel") / "src", n_shards=3)
    return d, decoded, cfg


@pytest.fixture(scope="module")
def outputs(release, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    src = release[0]
    recipes = {"native": Recipe("native"), "native32": Recipe("native", dtype="float32"),
               "none": Recipe("none", dtype="float32"), "q4": Recipe("q4"), "q2": Recipe("q2", group_size=32)}
    for name, r in recipes.items():
        convert(src, root / name, r, shard_gb=200e3 / 1e9, progress=False, log=lambda s: None)
    return root


def _stored_tensor_bytes(path, pattern="model-*.safetensors"):
    from mlx_dsv4.convert.reader import read_header

    return sum(e.nbytes for f in Path(path).glob(pattern) for e in read_header(f).values())


def test_fixture_spreads_weights_and_scales_over_shards(release):
    wm = json.loads((release[0] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(wm.values())) == 3
    assert wm["layers.0.attn.wq_a.weight"] != wm["layers.0.attn.wq_a.scale"]


def test_native_layout_and_config(release, outputs):
    out = outputs / "native"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlx_dsv4_format"] == 1 and "quantization_config" not in cfg
    q = cfg["quantization"]
    assert q["layers.3.ffn.experts.w1"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert q["layers.3.attn.wo_a"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert q["layers.2.attn.indexer.wq_b"]["mode"] == "mxfp8"
    # the release stores these in BF16: native keeps them float
    assert q["embed"] is False and q["layers.2.attn.compressor.wkv"] is False
    assert q["layers.2.attn.indexer.weights_proj"] is False
    wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(wm.values())) > 1 and all(f.startswith("model-") for f in wm.values())
    assert not any(k.startswith("mtp.") for k in wm)
    mtp = json.loads((out / "mtp.safetensors.index.json").read_text())["weight_map"]
    assert mtp and all(k.startswith("mtp.") and f.startswith("mtp-") for k, f in mtp.items())
    t = read_dir(out)
    c = release[2]
    E, I, D = c["n_routed_experts"], c["moe_intermediate_size"], c["hidden_size"]
    assert t["layers.3.ffn.experts.w1.weight"].shape == (E, I, D // 8)
    assert t["layers.3.ffn.experts.w2.weight"].shape == (E, D, I // 8)
    assert t["layers.3.ffn.experts.w1.scales"].shape == (E, I, D // 32)
    og, ol = c["o_groups"], c["o_lora_rank"]
    assert t["layers.0.attn.wo_a.weight"].shape == (og, ol, c["num_attention_heads"] * c["head_dim"] // og // 4)
    assert not any(k.endswith((".scale", "_scale_inv", ".biases")) for k in t)
    assert str(t["layers.0.hc_attn_fn"].dtype) == "mlx.core.float32"
    assert str(t["layers.0.attn_norm.weight"].dtype) == "mlx.core.float32"
    assert str(t["embed.weight"].dtype) == "mlx.core.bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "encoding/encoding_dsv4.py"):
        assert (out / f).read_bytes() == (release[0] / f).read_bytes()
    assert not list(out.parent.glob(".*partial"))


@pytest.mark.parametrize("name", ["native", "native32", "none"])
def test_lossless_recipes_reproduce_the_release_values_exactly(release, outputs, name):
    want = official_view(release[1], release[2])
    got = dequantized(outputs / name)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        assert np.array_equal(got[k], v), k


@pytest.mark.parametrize("name,bits,tol", [("q4", 4, 0.2), ("q2", 2, 0.7)])
def test_affine_recipes(release, outputs, name, bits, tol):
    out = outputs / name
    q = json.loads((out / "config.json").read_text())["quantization"]
    g = 64 if name == "q4" else 32
    assert q["layers.3.ffn.experts.w1"] == {"group_size": g, "bits": bits, "mode": "affine"}
    # w2's input width (moe_intermediate_size = 32) is not a multiple of 64: kept float, not padded
    assert q["layers.3.ffn.experts.w2"] == ({"group_size": 32, "bits": 2, "mode": "affine"} if g == 32 else False)
    assert q["layers.3.attn.wq_a"] == {"group_size": g, "bits": 8, "mode": "affine"}
    assert q["embed"] == {"group_size": g, "bits": 8, "mode": "affine"}
    assert q["layers.2.attn.compressor.wgate"] is False
    want = official_view(release[1], release[2])
    got = dequantized(out)
    for k in ("layers.3.ffn.experts.w1.weight", "layers.4.ffn.experts.w3.weight"):
        rel = np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()
        assert 0 < rel < tol, (k, rel)
    k = "layers.3.attn.wq_a.weight"
    assert np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() < 0.01
    assert np.array_equal(got["layers.3.ffn.gate.bias"], want["layers.3.ffn.gate.bias"])


def test_estimate_from_config_matches_written_bytes(release, outputs):
    cfg = json.loads((release[0] / "config.json").read_text())
    for name, r in (("native", Recipe("native")), ("q4", Recipe("q4")), ("none", Recipe("none", dtype="float32"))):
        e = estimate.estimate_config(cfg, r, context=4096)
        assert e.model_bytes == _stored_tensor_bytes(outputs / name), name
        assert _stored_tensor_bytes(outputs / name, "mtp-*.safetensors") == e.mtp_bytes, name


def test_verify_cli(outputs, tmp_path, capsys):
    assert cli(["convert", "--verify", str(outputs / "q4")]) == 0
    assert "verify: OK" in capsys.readouterr().out
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(outputs / "native", bad)
    idx = bad / "model.safetensors.index.json"
    wm = json.loads(idx.read_text())
    victim = wm["weight_map"]["layers.1.attn.wkv.weight"]
    data = (bad / victim).read_bytes()
    (bad / victim).write_bytes(data[:-10])
    assert cli(["convert", "--verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert victim in err and "truncated" in err
    cfg = json.loads((bad / "config.json").read_text())
    cfg["q_lora_rank"] += 32
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / victim).write_bytes(data)
    assert cli(["convert", "--verify", str(bad)]) == 1
    assert "layers.0.attn.wq_a.weight" in capsys.readouterr().err


def test_no_mtp_and_scale_variants(release, outputs, tmp_path):
    d, _, cfg = write_release_checkpoint(tmp_path / "inv", n_shards=2, scale_suffix="weight_scale_inv",
                                         scale_dtype="U8")
    convert(d, tmp_path / "o", Recipe("native"), include_mtp=False, progress=False, log=lambda s: None)
    assert not list((tmp_path / "o").glob("mtp*"))
    a, b = read_dir(tmp_path / "o"), read_dir(outputs / "native")
    assert same_tensors(a, {k: v for k, v in b.items() if not k.startswith("mtp.")})


def test_max_size_refuses_before_writing(release, tmp_path, capsys):
    rc = cli(["convert", "--hf-path", str(release[0]), "--mlx-path", str(tmp_path / "o"), "--max-size", "0.0001"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--max-size" in err and "output size:" in err and "estimated unified memory" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*"))


def test_estimate_only_preset_prints_flash_sizes(capsys):
    assert cli(["convert", "--estimate-only", "--preset", "flash", "--recipe", "q2"]) == 0
    out = capsys.readouterr().out
    assert "GB model" in out and "estimated unified memory" in out
    e = estimate.estimate_config(__import__("mlx_dsv4.convert.presets", fromlist=["x"]).PRESETS["flash"],
                                 Recipe("native"), 1 << 20)
    # the release is about 160 GB: FP4 experts + FP8 dense + BF16 embeddings
    assert 150e9 < e.in_bytes < 170e9 and abs(e.model_bytes + e.mtp_bytes - e.in_bytes) < 0.05 * e.in_bytes
    # section 6 of the format notes: about 3.7 GB of FP8 cache at 1M tokens
    assert 3.5e9 < e.kv_bytes <= 3.8e9


def test_interrupted_run_resumes_without_redoing_shards(release, outputs, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real = transform.compute
    calls = []

    def flaky(ckpt, unit):
        calls.append(unit.name)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return real(ckpt, unit)

    monkeypatch.setattr(transform, "compute", flaky)
    kw = dict(shard_gb=200e3 / 1e9, progress=False, log=lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        convert(release[0], out, Recipe("q4"), **kw)
    assert not out.exists()
    partial = tmp_path / ".o.partial"
    assert partial.is_dir() and not (partial / "config.json").exists()
    with pytest.raises(ConvertError, match="--resume"):
        convert(release[0], out, Recipe("q4"), **kw)
    with pytest.raises(ConvertError, match="different source or recipe"):
        convert(release[0], out, Recipe("q8"), resume=True, **kw)
    first = len(calls)
    convert(release[0], out, Recipe("q4"), resume=True, **kw)
    redone = len(calls) - first
    fresh = len(calls)
    convert(release[0], tmp_path / "fresh", Recipe("q4"), **kw)
    total_units = len(calls) - fresh
    assert 0 < redone < total_units - 30  # finished shards were not recomputed
    a, b = read_dir(out), read_dir(outputs / "q4")
    assert same_tensors(a, b)


def test_existing_output_needs_overwrite_and_is_replaced_atomically(release, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "marker").write_text("old")
    with pytest.raises(ConvertError, match="--overwrite"):
        convert(release[0], out, Recipe("native"), progress=False, log=lambda s: None)
    assert (out / "marker").exists()
    convert(release[0], out, Recipe("native"), overwrite=True, progress=False, log=lambda s: None)
    assert not (out / "marker").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_hub_repo_id_goes_through_snapshot_download(release, tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake(repo_id, revision=None, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(release[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert cli(["convert", "--hf-path", "deepseek-ai/DeepSeek-V4-Flash", "--revision", "abc123", "--quiet",
                "--mlx-path", str(tmp_path / "o")]) == 0
    assert seen["repo_id"] == "deepseek-ai/DeepSeek-V4-Flash" and seen["revision"] == "abc123"
    pats = seen["allow_patterns"]
    for f in ("config.json", "model-00001-of-00003.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "encoding/encoding_dsv4.py"):
        assert any(__import__("fnmatch").fnmatch(f, p) for p in pats), f
    assert not any(__import__("fnmatch").fnmatch("inference/model.py", p) for p in pats)


def test_offline_hub_cache_is_used(release, tmp_path):
    """A real snapshot_download against a local cache with HF_HUB_OFFLINE=1 (no network)."""
    import shutil

    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-v4" / "snapshots" / ("a" * 40)
    shutil.copytree(release[0], snap)
    (cache / "models--acme--tiny-v4" / "refs").mkdir()
    (cache / "models--acme--tiny-v4" / "refs" / "main").write_text("a" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-m", "mlx_dsv4.cli", "convert", "--quiet"]
    r = subprocess.run(cmd + ["--hf-path", "acme/tiny-v4", "--mlx-path", str(tmp_path / "o")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "encoding" / "encoding_dsv4.py").exists()
    r = subprocess.run(cmd + ["--hf-path", "acme/not-cached", "--mlx-path", str(tmp_path / "o2")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "acme/not-cached" in r.stderr and "Traceback" not in r.stderr
