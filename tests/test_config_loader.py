"""Config parsing, config errors, and checkpoint errors."""

import json
import shutil

import mlx.core as mx
import pytest

import mlx_dsv4
from mlx_dsv4 import CheckpointError, ConfigError, ModelArgs
from mlx_dsv4.tiny import tiny_config


def test_transformers_style_config_equals_official():
    from transformers import DeepseekV4Config

    official = tiny_config("pro")
    hf_style = DeepseekV4Config(**official).to_dict()
    for key in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling", "rope_theta",
                "compress_rope_theta"):
        hf_style.pop(key, None)
    assert {"layer_types", "mlp_layer_types", "rope_parameters", "partial_rotary_factor"} <= set(hf_style)
    assert ModelArgs.from_dict(hf_style) == ModelArgs.from_dict(official)


@pytest.mark.parametrize(
    "change, field, value",
    [
        ({"compress_ratios": [0, 0, 8, 128, 4, 128]}, "compress_ratios[2]", "8"),
        ({"compress_ratios": [0, 4, 128]}, "compress_ratios", "num_hidden_layers is 6"),
        ({"num_key_value_heads": 8}, "num_key_value_heads", "8"),
        ({"qk_rope_head_dim": 128}, "qk_rope_head_dim", "head_dim"),
        ({"scoring_func": "softmax"}, "scoring_func", "softmax"),
        ({"o_groups": 3}, "o_groups", "3"),
        ({"hidden_size": 0}, "hidden_size", "0"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type", "linear"),
        ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}}, "rope_scaling.factor", "None"),
        ({"layer_types": ["sliding_attention", "dense"] + ["sliding_attention"] * 4}, "layer_types[1]", "dense"),
        ({"mlp_layer_types": ["moe", "hash_moe"] + ["moe"] * 4}, "mlp_layer_types", "first"),
    ],
)
def test_bad_config_names_field_and_value(change, field, value):
    cfg = tiny_config("flash")
    if "layer_types" in change:
        del cfg["compress_ratios"]
    if "compress_ratios" in change and len(change["compress_ratios"]) != 6:
        cfg["num_hidden_layers"] = 6
    cfg.update(change)
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_dict(cfg)
    assert field in str(err.value) and value in str(err.value)


def test_missing_schedule_and_bad_json(tmp_path):
    cfg = tiny_config("flash")
    del cfg["compress_ratios"]
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelArgs.from_dict(cfg)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: invalid JSON"):
        ModelArgs.from_path(tmp_path)


@pytest.fixture
def ckpt(tiny_dirs, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["flash"], out)
    return out


def rewrite(ckpt, edit):
    weights = mx.load(str(ckpt / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(ckpt / "model.safetensors"), weights)


def test_missing_tensor_is_listed(ckpt):
    rewrite(ckpt, lambda w: (w.pop("layers.3.attn.compressor.ape"), w.pop("layers.1.attn.attn_sink")))
    with pytest.raises(CheckpointError) as err:
        mlx_dsv4.load_model(ckpt)
    assert "missing tensors (2)" in str(err.value)
    assert "layers.3.attn.compressor.ape" in str(err.value) and "layers.1.attn.attn_sink" in str(err.value)


def test_missing_expert_is_named(ckpt):
    rewrite(ckpt, lambda w: w.pop("layers.4.ffn.experts.5.w2.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.4\.ffn\.experts\.\{5\}\.w2\.weight"):
        mlx_dsv4.load_model(ckpt)


def test_unexpected_tensor_is_listed(ckpt):
    rewrite(ckpt, lambda w: w.update({"layers.0.attn.bogus.weight": mx.zeros((2,))}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): layers\.0\.attn\.bogus\.weight"):
        mlx_dsv4.load_model(ckpt)


def test_quantised_release_checkpoint_points_to_convert(ckpt):
    rewrite(ckpt, lambda w: w.update({"layers.0.attn.wq_a.scale": mx.zeros((1, 1), dtype=mx.uint8)}))
    with pytest.raises(CheckpointError, match="layers.0.attn.wq_a.scale.*mlx-dsv4 convert"):
        mlx_dsv4.load_model(ckpt)


def test_shape_inconsistent_with_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["q_lora_rank"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wq_a\.weight: checkpoint \(32, 64\) vs config \(48, 64\)"):
        mlx_dsv4.load_model(ckpt)


def test_index_naming_absent_shard(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"embed.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        mlx_dsv4.load_model(ckpt)


def test_truncated_safetensors_names_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        mlx_dsv4.load_model(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        mlx_dsv4.load_model(tmp_path / "nope")


def test_bfloat16_checkpoint_behaves_like_the_reference_in_bfloat16(tiny_dirs, tmp_path):
    """bf16 weights and activations (float32 norms, mHC): as close to float32 as transformers' own bf16 run."""
    import numpy as np
    import torch

    from mlx_dsv4.tiny import write_tiny_checkpoint
    from parity import reference_logits
    from transformers import DeepseekV4ForCausalLM

    path = write_tiny_checkpoint(tmp_path / "bf16", preset="flash", seed=0, dtype="bfloat16", vocab_size=512)
    m16 = mlx_dsv4.load_model(path)
    assert m16.layers[0].attn.wq_a.weight.dtype == mx.bfloat16 and m16.dtype == mx.bfloat16
    assert m16.layers[0].hc_attn_fn.dtype == mx.float32 and m16.layers[0].attn_norm.weight.dtype == mx.float32
    tokens = np.random.default_rng(0).integers(0, 512, (1, 200))
    ours = m16(mx.array(tokens), cache=m16.make_cache("bf16", "bf16"))
    assert ours.dtype == mx.bfloat16  # float32 norm weights do not promote the activations
    ours = np.array(ours.astype(mx.float32))
    ref16 = DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    with torch.no_grad():
        ref16 = ref16(torch.tensor(tokens), use_cache=False).logits.float().numpy()
    ref32 = reference_logits(tiny_dirs["flash"], tokens)

    def rel(a, b):
        return np.abs(a - b).mean() / np.abs(b).mean()

    assert rel(ours, ref16) < 0.05
    assert rel(ours, ref32) < 1.5 * rel(ref16, ref32) + 0.01
    assert (ours.argmax(-1) == ref16.argmax(-1)).mean() >= 0.9  # bf16 logits tie often
