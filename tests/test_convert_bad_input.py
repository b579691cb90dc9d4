"""Every kind of bad input fails fast, names file/tensor/offset, and leaves previous output alone."""

import errno
import json
import shutil

import numpy as np
import pytest

from convert_fixtures import RELEASE_QUANT, release_tensors, tiny_cfg, write_shards
from mlx_dsv4.cli import main as cli
from mlx_dsv4.convert import writer
from mlx_dsv4.convert.convert import convert
from mlx_dsv4.convert.errors import ConvertError
from mlx_dsv4.convert.recipes import Recipe


@pytest.fixture(scope="module")
def stored():
    from mlx_dsv4.tiny import tiny_weights

    cfg = tiny_cfg(vocab_size=128)
    st, _ = release_tensors(tiny_weights(cfg, seed=3, mtp=False))
    return cfg, st


def make(tmp_path, stored, mutate=None, n_shards=3):
    cfg, st = stored
    st = dict(st)
    if mutate:
        mutate(st)
    src = tmp_path / "src"
    src.mkdir()
    write_shards(src, st, n_shards)
    (src / "config.json").write_text(json.dumps(dict(cfg, quantization_config=RELEASE_QUANT, expert_dtype="fp4")))
    return src


@pytest.fixture
def previous(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"previous": true}')
    return out


def fails(src, out, match, **kw):
    with pytest.raises(ConvertError) as e:
        convert(src, out, Recipe("native"), overwrite=True, progress=False, log=lambda s: None, **kw)
    msg = str(e.value)
    for m in match:
        assert m in msg, msg
    assert json.loads((out / "config.json").read_text()) == {"previous": True}
    return msg


def _shard_of(src, tensor):
    return json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_truncated_shard(tmp_path, stored, previous):
    src = make(tmp_path, stored)
    shard = src / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    msg = fails(src, previous, [shard.name, "truncated", "byte offset", "tensor '"])
    assert str(len(data) - 100) in msg
    assert not (tmp_path / ".out.partial").exists()


def test_corrupt_header(tmp_path, stored, previous):
    src = make(tmp_path, stored)
    shard = src / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    shard.write_bytes(bytes(data))
    fails(src, previous, [shard.name, "corrupt safetensors header"])


def test_header_length_beyond_file(tmp_path, stored, previous):
    src = make(tmp_path, stored)
    shard = src / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (10**7).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    fails(src, previous, [shard.name, "header length 10000000", "byte offset 0"])


def test_missing_shard(tmp_path, stored, previous):
    src = make(tmp_path, stored)
    (src / "model-00002-of-00003.safetensors").unlink()
    fails(src, previous, ["model-00002-of-00003.safetensors", "missing shard", "tensor '"])


def test_corrupt_index(tmp_path, stored, previous):
    src = make(tmp_path, stored)
    (src / "model.safetensors.index.json").write_text("{not json")
    fails(src, previous, ["model.safetensors.index.json", "corrupt index"])


def test_scale_without_weight(tmp_path, stored, previous):
    src = make(tmp_path, stored, lambda st: st.pop("layers.1.attn.wkv.weight"))
    fails(src, previous, ["layers.1.attn.wkv.scale", "scale without its weight", "layers.1.attn.wkv.weight",
                          _shard_of(src, "layers.1.attn.wkv.scale")])


def test_fp8_weight_without_scale(tmp_path, stored, previous):
    src = make(tmp_path, stored, lambda st: st.pop("layers.2.attn.wq_b.scale"))
    fails(src, previous, ["layers.2.attn.wq_b.weight", "FP8 weight without its scale",
                          _shard_of(src, "layers.2.attn.wq_b.weight")])


def test_fp4_weight_without_scale(tmp_path, stored, previous):
    src = make(tmp_path, stored, lambda st: st.pop("layers.4.ffn.experts.5.w2.scale"))
    fails(src, previous, ["layers.4.ffn.experts.5.w2.weight", "FP4 weight without its scale"])


def test_scale_grid_that_does_not_fit_its_weight(tmp_path, stored, previous):
    def bad(st):
        s, dt = st["layers.0.attn.wo_b.scale"]
        st["layers.0.attn.wo_b.scale"] = (np.concatenate([s, s], axis=0), dt)

    src = make(tmp_path, stored, bad)
    fails(src, previous, ["layers.0.attn.wo_b.scale", "does not fit weight", "128x128"])


def test_shape_inconsistent_with_config(tmp_path, stored, previous):
    def bad(st):
        st["layers.1.attn.attn_sink"] = (np.zeros(5, np.float32), "F32")

    src = make(tmp_path, stored, bad)
    fails(src, previous, ["layers.1.attn.attn_sink", "inconsistent with config.json", "[5]", "[4]",
                          _shard_of(src, "layers.1.attn.attn_sink")])


def test_config_that_disagrees_with_all_shapes(tmp_path, stored, previous):
    src = make(tmp_path, stored)
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    fails(src, previous, ["inconsistent with config.json", "tensor '"])


def test_missing_tensor(tmp_path, stored, previous):
    src = make(tmp_path, stored, lambda st: st.pop("layers.2.attn.compressor.ape"))
    fails(src, previous, ["missing tensor 'layers.2.attn.compressor.ape'", "config.json"])


def test_unknown_tensor(tmp_path, stored, previous):
    src = make(tmp_path, stored, lambda st: st.update({"layers.9.attn.wkv.bias": (np.zeros(3, np.float32), "F32")}))
    fails(src, previous, ["layers.9.attn.wkv.bias", "not a DeepSeek-V4 tensor"])


def test_unsupported_dtype(tmp_path, stored, previous):
    import torch
    from safetensors.torch import save_file

    src = make(tmp_path, stored)
    shard = src / "model-00001-of-00003.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    name = next(k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn)
    tensors[name] = tensors[name].view(torch.uint8).view(torch.float8_e5m2)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    fails(src, previous, [shard.name, name, "unsupported dtype F8_E5M2"])


def test_missing_config(tmp_path, stored, previous):
    src = make(tmp_path, stored)
    (src / "config.json").unlink()
    fails(src, previous, ["config.json", "missing"])


def test_unwritable_output(tmp_path, stored, monkeypatch):
    src = make(tmp_path, stored)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConvertError, match="not a directory"):
        convert(src, blocker / "out", Recipe("native"), progress=False, log=lambda s: None)

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(writer.Path, "mkdir", denied)
    with pytest.raises(ConvertError) as e:
        convert(src, tmp_path / "out", Recipe("native"), progress=False, log=lambda s: None)
    assert "cannot write" in str(e.value) and "Permission denied" in str(e.value) and str(tmp_path) in str(e.value)


def test_disk_too_small_is_refused_up_front(tmp_path, stored, previous, monkeypatch):
    src = make(tmp_path, stored)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    fails(src, previous, ["not enough free space", "previous output is untouched"])


def test_disk_full_while_writing(tmp_path, stored, previous, monkeypatch):
    src = make(tmp_path, stored)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "fsync", full)
    msg = fails(src, previous, ["output disk is full", "model-00001-of-", "tensor '", "previous output is untouched"])
    assert ".tmp" in msg
    partial = tmp_path / ".out.partial"
    assert not list(partial.glob("*.safetensors*")) and not (partial / "config.json").exists()


def test_cli_reports_errors_without_traceback(tmp_path, stored, capsys):
    src = make(tmp_path, stored, lambda st: st.pop("layers.2.attn.wq_b.scale"))
    assert cli(["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "layers.2.attn.wq_b.weight" in err
    assert cli(["convert", "--hf-path", "not a repo", "--mlx-path", str(tmp_path / "o")]) == 1
    assert "not a Hub repo id" in capsys.readouterr().err
