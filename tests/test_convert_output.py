"""The output side of the converter: it never replaces its input or paths it did not create, a failed
write keeps the previous state, a run stopped while finishing resumes, and shard checksums catch
changed bytes in --verify and on --resume."""

import errno
import hashlib
import json
import os
import pathlib
import shutil

import mlx.core as mx
import numpy as np
import pytest

from convert_fixtures import read_dir, same_tensors, write_release_checkpoint
import mlx_dsv4
from mlx_dsv4.cli import main as cli
from mlx_dsv4.convert import transform, writer
from mlx_dsv4.convert.convert import convert
from mlx_dsv4.convert.errors import ConvertError
from mlx_dsv4.convert.reader import read_header
from mlx_dsv4.convert.recipes import Recipe
from mlx_dsv4.convert.verify import verify_dir

SHARD_GB = 200e3 / 1e9  # several shards from the tiny checkpoint


class Killed(BaseException):
    """The process stopping at this point (not an exception the converter may catch)."""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_release_checkpoint(tmp_path_factory.mktemp("src") / "src", n_shards=2)[0]


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "o"
    run(source, out)
    return read_dir(out)


def run(src, out, **kw):
    kw.setdefault("log", lambda s: None)
    return convert(src, out, Recipe("native"), shard_gb=SHARD_GB, progress=False, **kw)


def tree(root) -> dict:
    """Every file under root (links not followed) with a digest of its bytes."""
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def previous_output(path):
    path.mkdir()
    (path / "config.json").write_text('{"previous": true}')
    return path


# --- overlapping input and output -------------------------------------------------------------

def _same(tmp, src):
    return src, src


def _output_holds_input(tmp, src):
    return src, src.parent


def _input_holds_output(tmp, src):
    return src, src / "mlx"


def _output_links_to_input(tmp, src):
    (tmp / "link").symlink_to(src, target_is_directory=True)
    return src, tmp / "link"


def _input_shards_link_into_output(tmp, src):
    """A checkpoint directory of symbolic links to shards stored inside the output directory."""
    out = tmp / "store"
    shutil.move(str(src), out)
    links = tmp / "links"
    links.mkdir()
    for f in out.iterdir():
        (links / f.name).symlink_to(f)
    return links, out


@pytest.mark.parametrize("layout", [_same, _output_holds_input, _input_holds_output, _output_links_to_input,
                                    _input_shards_link_into_output])
def test_output_overlapping_the_input_is_refused_before_writing(source, tmp_path, layout):
    root = tmp_path / "root"
    shutil.copytree(source, root / "src")
    src, out = layout(tmp_path, root / "src")
    before = tree(tmp_path)
    with pytest.raises(ConvertError) as e:
        run(src, out, overwrite=True)
    msg = str(e.value)
    assert str(src) in msg and str(out) in msg and "overlap" in msg
    assert tree(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*")]


def test_existing_backup_name_is_not_deleted(source, tmp_path):
    out = previous_output(tmp_path / "o")
    mine = tmp_path / ".o.old"
    mine.mkdir()
    (mine / "notes.txt").write_text("not made by the converter")
    run(source, out, overwrite=True)
    assert (mine / "notes.txt").read_text() == "not made by the converter"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.old", "o"]
    assert verify_dir(out)[0] == []


def test_dangling_symlink_output_needs_overwrite(source, tmp_path):
    out = tmp_path / "o"
    out.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConvertError, match="--overwrite"):
        run(source, out)
    assert out.is_symlink()
    run(source, out, overwrite=True)
    assert out.is_dir() and not out.is_symlink() and verify_dir(out)[0] == []


# --- failed writes ----------------------------------------------------------------------------

def _half_then_full(target: str, monkeypatch, skip=0):
    """Path.write_text of files named target* writes half its text, then fails with ENOSPC (after `skip`
    successful writes); returns the list of what the file held just before each failure."""
    real = pathlib.Path.write_text
    seen = {"calls": 0, "before": []}

    def write_text(self, data, *a, **k):
        if self.name.startswith(target):
            seen["calls"] += 1
            if seen["calls"] > skip:
                final = self.parent / target
                seen["before"].append(final.read_text() if final.exists() else None)
                real(self, data[: len(data) // 2], *a, **k)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    return seen


@pytest.mark.parametrize("target,what", [(writer.STATE, "conversion state"),
                                         ("model.safetensors.index.json", "model.safetensors.index.json"),
                                         ("config.json", "config.json")])
def test_disk_full_while_writing_a_json_file_keeps_its_previous_version(source, reference, tmp_path, monkeypatch,
                                                                       target, what):
    out = previous_output(tmp_path / "o")
    seen = _half_then_full(target, monkeypatch, skip=2 if target == writer.STATE else 0)
    with pytest.raises(ConvertError) as e:
        run(source, out, overwrite=True)
    msg = str(e.value)
    partial = tmp_path / ".o.partial"
    assert str(partial / target) in msg and "disk is full" in msg and what in msg
    assert json.loads((out / "config.json").read_text()) == {"previous": True}
    written = partial / target
    before = seen["before"][0]
    assert (written.read_text() if written.exists() else None) == before
    if target == writer.STATE:
        assert before is not None and json.loads(before)
    assert not list(partial.glob("*.tmp"))
    monkeypatch.undo()
    run(source, out, resume=True, overwrite=True)
    assert same_tensors(read_dir(out), reference) and verify_dir(out)[0] == []


def test_failed_copy_of_a_tokenizer_file_leaves_no_partial_copy(source, tmp_path, monkeypatch):
    real = shutil.copyfile

    def copyfile(src, dst, *a, **k):
        if pathlib.Path(src).name == "tokenizer.json":
            pathlib.Path(dst).write_bytes(pathlib.Path(src).read_bytes()[:5])
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(writer.shutil, "copyfile", copyfile)
    with pytest.raises(ConvertError) as e:
        run(source, tmp_path / "o")
    partial = tmp_path / ".o.partial"
    assert str(partial / "tokenizer.json") in str(e.value) and "Permission denied" in str(e.value)
    assert not (partial / "tokenizer.json").exists() and not list(partial.glob("*.tmp"))


@pytest.mark.parametrize("failing", ["previous aside", "new into place"])
def test_failed_rename_when_finishing_keeps_previous_output(source, reference, tmp_path, monkeypatch, failing):
    out = previous_output(tmp_path / "o")
    partial = tmp_path / ".o.partial"
    real = os.replace

    def replace(a, b):
        moving = pathlib.Path(a) == out if failing == "previous aside" else pathlib.Path(a) == partial
        if moving:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(a, b)

    monkeypatch.setattr(writer.os, "replace", replace)
    with pytest.raises(ConvertError) as e:
        run(source, out, overwrite=True)
    msg = str(e.value)
    assert str(out) in msg and "Permission denied" in msg and str(partial) in msg and "--resume" in msg
    assert json.loads((out / "config.json").read_text()) == {"previous": True}
    monkeypatch.undo()
    run(source, out, resume=True, overwrite=True)
    assert same_tensors(read_dir(out), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# --- a run stopped while finishing ------------------------------------------------------------

def _stop_at_finish_step(k, monkeypatch):
    """Raises Killed instead of the k-th filesystem change made by OutputDir.finish (counting from 0);
    returns a dict whose "steps" counts the changes reached."""
    seen = {"active": False, "steps": 0}

    def counted(real):
        def step(*a, **k2):
            if seen["active"]:
                if seen["steps"] == k:
                    raise Killed
                seen["steps"] += 1
            return real(*a, **k2)
        return step

    monkeypatch.setattr(writer.os, "replace", counted(os.replace))
    monkeypatch.setattr(writer.shutil, "rmtree", counted(shutil.rmtree))
    monkeypatch.setattr(pathlib.Path, "unlink", counted(pathlib.Path.unlink))
    monkeypatch.setattr(pathlib.Path, "write_text", counted(pathlib.Path.write_text))
    real_finish = writer.OutputDir.finish

    def finish(self):
        seen["active"] = True
        try:
            return real_finish(self)
        finally:
            seen["active"] = False

    monkeypatch.setattr(writer.OutputDir, "finish", finish)
    return seen


@pytest.mark.parametrize("replacing", [True, False])
def test_resume_after_a_stop_at_any_step_of_the_finish(source, reference, tmp_path, monkeypatch, replacing):
    k = 0
    while True:
        root = tmp_path / str(k)
        root.mkdir()
        out = root / "o"
        if replacing:
            previous_output(out)
        seen = _stop_at_finish_step(k, monkeypatch)
        try:
            run(source, out, overwrite=replacing)
        except Killed:
            pass
        else:
            break
        monkeypatch.undo()
        logged = []
        run(source, out, resume=True, overwrite=replacing, log=logged.append)
        assert sorted(p.name for p in root.iterdir()) == ["o"], (k, logged)
        assert verify_dir(out)[0] == [] and same_tensors(read_dir(out), reference), k
        assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")], k
        k += 1
    assert seen["steps"] == k >= (3 if replacing else 2)


def test_unreadable_resume_state_is_named(source, tmp_path, monkeypatch):
    calls = []

    def stop(ckpt, unit):
        calls.append(unit)
        if len(calls) == 30:
            raise Killed
        return real(ckpt, unit)

    real = transform.compute
    monkeypatch.setattr(transform, "compute", stop)
    with pytest.raises(Killed):
        run(source, tmp_path / "o")
    monkeypatch.undo()
    state = tmp_path / ".o.partial" / writer.STATE
    state.write_text(state.read_text()[:20])
    with pytest.raises(ConvertError) as e:
        run(source, tmp_path / "o", resume=True)
    assert str(state) in str(e.value) and "unreadable" in str(e.value)


def test_unreadable_source_index_is_reported(source, tmp_path, monkeypatch):
    def unreadable(real):
        def read(self, *a, **k):
            if self.name == "model.safetensors.index.json" and self.parent == source:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(self, *a, **k)
        return read

    for method in ("read_text", "read_bytes"):
        monkeypatch.setattr(pathlib.Path, method, unreadable(getattr(pathlib.Path, method)))
    with pytest.raises(ConvertError) as e:
        run(source, tmp_path / "o")
    assert str(source / "model.safetensors.index.json") in str(e.value) and "Permission denied" in str(e.value)


# --- checksums --------------------------------------------------------------------------------

def _data_start(shard):
    return min(e.start for e in read_header(shard).values())


def test_verify_reports_a_shard_whose_data_bytes_changed(source, tmp_path, capsys):
    out = tmp_path / "o"
    run(source, out)
    assert cli(["convert", "--verify", str(out)]) == 0
    shard = out / "model-00003-of-00006.safetensors"
    data = bytearray(shard.read_bytes())
    data[_data_start(shard) + 5] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems, _ = verify_dir(out)
    assert len(problems) == 1 and str(shard) in problems[0]
    capsys.readouterr()
    assert cli(["convert", "--verify", str(out)]) == 1
    assert shard.name in capsys.readouterr().err


def test_resume_rewrites_a_finished_shard_whose_bytes_changed(source, reference, tmp_path, monkeypatch):
    out = tmp_path / "o"
    calls = []
    real = transform.compute

    def stop(ckpt, unit):
        calls.append(unit)
        if len(calls) == 120:  # inside the fourth of six shards
            raise Killed
        return real(ckpt, unit)

    monkeypatch.setattr(transform, "compute", stop)
    with pytest.raises(Killed):
        run(source, out)
    monkeypatch.undo()
    partial = tmp_path / ".o.partial"
    finished = sorted(partial.glob("model-*.safetensors"))
    assert len(finished) >= 2
    victim = finished[1]
    entry = next(e for e in read_header(victim).values() if e.dtype in ("F32", "BF16"))
    with open(victim, "r+b") as f:
        f.seek(entry.start)
        f.write(b"\xff" * (4 if entry.dtype == "F32" else 2))  # NaN
    logged = []
    run(source, out, resume=True, log=logged.append)
    assert any(str(victim) in line and "rewriting" in line for line in logged), logged
    assert verify_dir(out)[0] == []
    got = read_dir(out)
    assert same_tensors(got, reference)
    floats = [v.astype(mx.float32) for v in got.values() if v.dtype in (mx.float32, mx.bfloat16)]
    assert floats and all(bool(mx.isfinite(v).all()) for v in floats)


def test_hash_tables_are_stored_in_one_byte_and_read_back_as_the_source(tmp_path):
    src, decoded, cfg = write_release_checkpoint(tmp_path / "src", n_shards=1)
    out = tmp_path / "out"
    run(src, out)
    converted = read_dir(out)
    names = [n for n in decoded if n.endswith("gate.tid2eid")]
    assert names and cfg["n_routed_experts"] <= 256
    for name in names:
        assert converted[name].dtype == mx.uint8
        assert mx.array_equal(converted[name].astype(mx.int32), mx.array(decoded[name]).astype(mx.int32))
    model = mlx_dsv4.load_model(out)
    assert model.layers[0].ffn.gate.tid2eid.dtype == mx.int32
    assert mx.array_equal(model.layers[0].ffn.gate.tid2eid, mx.array(decoded[names[0]]).astype(mx.int32))


def test_an_expert_id_that_does_not_fit_a_byte_is_named(tmp_path):
    from mlx_dsv4.tiny import tiny_weights

    _, _, cfg = write_release_checkpoint(tmp_path / "probe", n_shards=1)
    weights = tiny_weights(cfg, seed=0)
    table = np.array(weights["layers.0.ffn.gate.tid2eid"])
    table[7, 1] = 300
    weights["layers.0.ffn.gate.tid2eid"] = table
    src, _, _ = write_release_checkpoint(tmp_path / "src", n_shards=1, weights=weights, cfg=cfg)
    with pytest.raises(ConvertError, match=r"layers\.0\.ffn\.gate\.tid2eid'?: values 0\.\.300 do not fit U8"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
