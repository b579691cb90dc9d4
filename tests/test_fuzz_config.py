"""Fuzzing the config and index a user hands to the loader and the converter: any input gives a
result or a named error (ConfigError / ConvertError), never another exception, and the converter
writes nothing outside its output directory."""

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_dsv4.config import ConfigError, ModelArgs
from mlx_dsv4.convert.convert import convert
from mlx_dsv4.convert.errors import ConvertError
from mlx_dsv4.convert.estimate import estimate_config
from mlx_dsv4.convert.recipes import Recipe
from mlx_dsv4.tiny import tiny_config

BASE = tiny_config("flash", vocab_size=128)
FIELDS = sorted(BASE) + ["layer_types", "compress_rates", "mlp_layer_types", "partial_rotary_factor",
                         "rope_parameters", "index_heads", "quantization_config", "expert_dtype"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["sliding_attention", "compressed_sparse_attention", "hash_moe", "moe", "yarn", "fp4"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=8),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


@st.composite
def configs(draw):
    """The tiny config with a few fields replaced by arbitrary JSON values or removed."""
    cfg = json.loads(json.dumps(BASE))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()) and name in cfg:
            del cfg[name]
        else:
            cfg[name] = draw(values)
    return cfg


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(configs())
def test_config_parsing_gives_args_or_config_error(cfg):
    try:
        args = ModelArgs.from_dict(cfg)
    except ConfigError as e:
        assert str(e)
        return
    assert len(args.compress_ratios) == args.num_hidden_layers


@FUZZ
@given(configs())
def test_estimates_give_a_result_or_convert_error(cfg):
    try:
        est = estimate_config(cfg, Recipe("q4"), 1024)
    except ConvertError as e:
        assert str(e)
        return
    assert est.model_bytes > 0


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from mlx_dsv4.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "src", preset="flash", vocab_size=128, mtp=False)


def files_under(root: Path) -> set:
    return {p for p in root.rglob("*")}


def run_convert(source, tmp_path_factory, config_text=None, index=None):
    root = tmp_path_factory.mktemp("case")
    src = root / "src"
    shutil.copytree(source, src)
    if config_text is not None:
        (src / "config.json").write_text(config_text)
    if index is not None:
        (src / "model.safetensors.index.json").write_text(index)
    before = files_under(root)
    out = root / "out"
    try:
        convert(src, out, Recipe("none", dtype="float32"), progress=False, log=lambda s: None)
        ok = True
    except ConvertError as e:
        assert str(e)
        ok = False
    outside = {p for p in files_under(root) - before if out not in p.parents and p != out}
    assert not outside, outside
    assert (out / "config.json").exists() == ok
    return ok


CONVERT_FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@CONVERT_FUZZ
@given(configs())
def test_convert_any_config(source, tmp_path_factory, cfg):
    run_convert(source, tmp_path_factory, config_text=json.dumps(cfg))


@CONVERT_FUZZ
@given(st.one_of(values.map(lambda v: json.dumps({"weight_map": v})), values.map(json.dumps),
                 st.text(max_size=40)))
def test_convert_any_index(source, tmp_path_factory, index):
    run_convert(source, tmp_path_factory, index=index)
