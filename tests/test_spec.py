"""The checkpoint contract: the spec, the Model, the converter's plan and the tiny writer agree.

Independent anchors come from the published model card and format description (V4-Flash has
284B parameters and V4-Pro 1.6T; the per-tensor shapes of the format description), not from
the code under test.
"""

import math

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_dsv4 import spec
from mlx_dsv4.config import ConfigError, ModelArgs
from mlx_dsv4.convert.plan import plan_units, sources_from_config
from mlx_dsv4.convert.presets import PRESETS
from mlx_dsv4.convert.recipes import Recipe
from mlx_dsv4.model import Model
from mlx_dsv4.tiny import dspark_config, tiny_config, tiny_weights, write_tiny_checkpoint

TINY_VARIANTS = {
    "flash": tiny_config("flash", vocab_size=256),
    "pro": tiny_config("pro", vocab_size=256),
    "no-mtp, no hash layers": tiny_config("flash", vocab_size=256, num_nextn_predict_layers=0, num_hash_layers=0),
    "all CSA, two MTP layers": tiny_config("flash", vocab_size=256, compress_ratios=[4, 4],
                                           num_nextn_predict_layers=2),
    "MTP ratio listed after the decoder's": tiny_config("flash", vocab_size=256, compress_ratios=[0, 4, 128, 4],
                                                        num_hidden_layers=3),
    "no shared expert": tiny_config("pro", vocab_size=256, n_shared_experts=0),
    "DSpark drafter": tiny_config("flash", vocab_size=256, **dspark_config(6, 256)),
}
ALL_CONFIGS = {**{f"{k} preset": v for k, v in PRESETS.items()}, **TINY_VARIANTS}


def model_tree(args):
    """Names and shapes of the Model's parameters (lazy arrays: nothing is allocated)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}


def plan_outputs(args, recipe, mtp):
    units = plan_units(sources_from_config(args, mtp), args,
                       lambda m, fam, kind, k: recipe.decide(fam, kind, k), recipe.float_dtype, mtp)
    return {name: tuple(shape) for u in units for name, _, shape in u.outputs}


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_model_and_converter_plan_match_the_spec(name):
    args = ModelArgs.from_dict(ALL_CONFIGS[name])
    assert model_tree(args) == spec.mlx_tensors(args)
    float_recipe = Recipe("none", dtype="float32")
    assert plan_outputs(args, float_recipe, mtp=False) == spec.mlx_tensors(args)
    assert plan_outputs(args, float_recipe, mtp=True) == spec.mlx_tensors(args, mtp=True)
    mtp_only = set(spec.mlx_tensors(args, mtp=True)) - set(spec.mlx_tensors(args))
    assert all(spec.is_mtp(n) for n in mtp_only)
    assert len(mtp_only) > 0 if args.num_nextn_predict_layers else not mtp_only


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_tiny_writer_writes_the_spec_and_loads(name, tmp_path):
    cfg = TINY_VARIANTS[name]
    args = ModelArgs.from_dict(cfg)
    weights = tiny_weights(cfg, seed=0)
    assert list(weights) == list(spec.official_tensors(args))
    assert {k: v.shape for k, v in weights.items()} == spec.official_tensors(args)
    preset = "pro" if cfg["compress_ratios"][0] == 128 else "flash"
    overrides = {k: v for k, v in cfg.items() if v != tiny_config(preset).get(k, object())}
    path = write_tiny_checkpoint(tmp_path / "ckpt", preset=preset, dtype="bfloat16", **overrides)
    stored = mx.load(str(path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in stored.items()} == spec.official_tensors(args)
    assert {k for k, v in stored.items() if v.dtype == mx.float32} == {k for k in stored if spec.keeps_float32(k)}
    import mlx_dsv4

    model = mlx_dsv4.load_model(path)
    assert {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())} == spec.mlx_tensors(args)


def test_published_sizes_and_shapes():
    flash, pro = (ModelArgs.from_dict(PRESETS[p]) for p in ("flash", "pro"))

    def billions(args):
        return sum(math.prod(s) for s in spec.official_tensors(args, mtp=False).values()) / 1e9

    assert 280 < billions(flash) < 288  # "284B total"
    assert 1500 < billions(pro) < 1650  # "1.6T"
    t = spec.official_tensors(flash)
    assert t["layers.2.attn.compressor.wkv.weight"] == (2 * 512, 4096)  # ratio 4: two halves
    assert t["layers.3.attn.compressor.ape"] == (128, 512)  # ratio 128: one
    assert t["layers.2.attn.indexer.wq_b.weight"] == (64 * 128, 1024)
    assert t["layers.2.attn.indexer.compressor.ape"] == (4, 256)
    assert t["layers.0.ffn.gate.tid2eid"] == (129280, 6) and "layers.0.ffn.gate.bias" not in t
    assert t["layers.3.ffn.gate.bias"] == (256,) and "layers.3.ffn.gate.tid2eid" not in t
    assert t["layers.5.attn.wo_a.weight"] == (8 * 1024, 64 * 512 // 8)
    assert t["layers.5.hc_attn_fn"] == ((2 + 4) * 4, 4 * 4096)
    assert t["mtp.0.e_proj.weight"] == (4096, 4096) and t["mtp.0.hc_head_fn"] == (4, 4 * 4096)
    assert "layers.0.attn.compressor.wkv.weight" not in t  # sliding-only layer
    m = spec.mlx_tensors(flash)
    assert m["layers.5.ffn.experts.w2.weight"] == (256, 4096, 2048)
    assert m["layers.5.attn.wo_a.weight"] == (8, 1024, 4096)


def test_release_precisions():
    args = ModelArgs.from_dict(PRESETS["flash"])
    assert spec.release_storage("layers.3.ffn.experts.7.w1.weight", args) == "fp4"
    assert spec.release_storage("layers.3.attn.wq_a.weight", args) == "fp8"
    assert spec.release_storage("layers.3.ffn.shared_experts.w2.weight", args) == "fp8"
    assert spec.release_storage("layers.0.ffn.gate.tid2eid", args) == "I32"
    for name in ("layers.3.hc_ffn_base", "layers.3.attn.attn_sink", "layers.2.attn.compressor.ape",
                 "layers.2.attn.indexer.compressor.norm.weight", "layers.3.ffn.gate.bias", "hc_head_scale"):
        assert spec.release_storage(name, args) == "F32", name
    for name in ("embed.weight", "head.weight", "layers.3.ffn.gate.weight"):
        assert spec.release_storage(name, args) == "BF16", name


def test_mtp_ratios_follow_the_decoder_or_default_to_sliding():
    with_mtp = ModelArgs.from_dict(tiny_config("flash", compress_ratios=[0, 4, 128, 4], num_hidden_layers=3))
    assert with_mtp.compress_ratios == [0, 4, 128] and with_mtp.mtp_compress_ratios == [4]
    assert "mtp.0.attn.indexer.wq_b.weight" in spec.official_tensors(with_mtp)
    plain = ModelArgs.from_dict(tiny_config("flash"))
    assert plain.mtp_compress_ratios == [0]
    with pytest.raises(ConfigError, match="num_hidden_layers is 3"):
        ModelArgs.from_dict(tiny_config("flash", compress_ratios=[0, 4, 128, 4, 4], num_hidden_layers=3))
