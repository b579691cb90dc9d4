"""Small random checkpoints in the official Hub layout, for tests and the demo.

They have V4's real structure (mHC, CSA/HCA with ratios 4 and 128, sliding
window 128, hash-routed first layers, YaRN compress RoPE) at toy widths.
"""

import json
from pathlib import Path

import numpy as np

from .config import ModelArgs
from .spec import keeps_float32, official_tensors

PRESETS = {
    # Flash ordering: two sliding-only layers, then CSA/HCA alternating.
    "flash": [0, 0, 4, 128, 4, 128],
    # Pro ordering: HCA first, then HCA/CSA interleaved.
    "pro": [128, 128, 128, 4, 128, 4],
}

TINY_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 129280,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "qk_rope_head_dim": 16,
    "q_lora_rank": 32,
    "o_groups": 2,
    "o_lora_rank": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "num_hash_layers": 3,
    "sliding_window": 128,
    "index_n_heads": 32,
    "index_head_dim": 32,
    "index_topk": 16,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1048576,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}

# config.json key marking a checkpoint whose weights are the random draw below (the converter keeps it),
# so that tools can say their results are meaningless for it.
RANDOM_WEIGHTS_KEY = "mlx_dsv4_random_weights"


def has_random_weights(config: dict) -> bool:
    """Whether a checkpoint's config.json says it holds `write_tiny_checkpoint`'s random weights."""
    return config.get(RANDOM_WEIGHTS_KEY) is True


def dspark_config(num_hidden_layers: int, vocab_size: int) -> dict:
    """The config keys of a tiny two-stage DSpark drafter reading three decoder layers."""
    L = num_hidden_layers
    return {"dspark_block_size": 4, "dspark_target_layer_ids": sorted({min(1, L - 1), L // 2, L - 1}),
            "dspark_noise_token_id": vocab_size - 1, "dspark_markov_rank": 16,
            "num_nextn_predict_layers": 2}


def tiny_config(preset: str = "flash", **overrides) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; expected one of {sorted(PRESETS)}")
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["compress_ratios"] = list(PRESETS[preset])
    cfg.update(overrides)
    cfg.setdefault("num_hidden_layers", len(cfg["compress_ratios"]))
    cfg["num_hash_layers"] = min(cfg["num_hash_layers"], cfg["num_hidden_layers"])
    return cfg


# (name suffix, standard deviation, offset) of the random values; linear weights [out, in] not listed
# here get std in**-0.5. "_scale" adds its offset after the float32 cast.
DRAW_RULES = (("embed.weight", 1.0, 0.0), ("markov_w1.weight", 1.0, 0.0), ("norm.weight", 0.1, 1.0), ("_fn", 0.1, 0.0), ("_base", 0.5, 0.0),
              ("_scale", 0.1, 1.0), ("attn_sink", 1.0, 0.0), (".ape", 0.5, 0.0), ("gate.bias", 0.1, 0.0))


def _draw(rng, name: str, shape: tuple, args):
    """Random values for one official tensor, scaled as a trained model's roughly are."""
    if name.endswith("tid2eid"):
        E, k = args.n_routed_experts, args.num_experts_per_tok
        return np.stack([rng.permutation(E)[:k] for _ in range(shape[0])]).astype(np.int32)
    suffix, std, offset = next((r for r in DRAW_RULES if name.endswith(r[0])), ("", shape[-1] ** -0.5, 0.0))
    if suffix == "_scale":
        return offset + rng.normal(0, std, shape).astype(np.float32)
    return (offset + rng.normal(0, std, shape)).astype(np.float32)


def tiny_weights(cfg, seed: int = 0, mtp: bool = True) -> dict:
    """Official-layout tensors (every name and shape of `spec.official_tensors`) as numpy arrays."""
    args = cfg if isinstance(cfg, ModelArgs) else ModelArgs.from_dict(cfg)
    rng = np.random.default_rng(seed)
    return {name: _draw(rng, name, shape, args) for name, shape in official_tensors(args, mtp=mtp).items()}


def write_tiny_checkpoint(out_dir, *, preset: str = "flash", seed: int = 0, dtype: str = "float32",
                          mtp: bool = True, mlx_lm: bool = False, dspark: bool = False, **config_overrides) -> Path:
    """Write config.json + model.safetensors (official names, per-expert tensors); with mlx_lm,
    also what mlx-lm needs to open the directory (model file, chat template, tokenizer files);
    with dspark, the mtp.* tensors are a DSpark drafter (`dspark_config`) instead of an MTP layer."""
    import mlx.core as mx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(preset, **config_overrides)
    if dspark:
        drafter = dspark_config(cfg["num_hidden_layers"], cfg["vocab_size"])
        cfg.update({k: v for k, v in drafter.items() if k not in config_overrides})
    target = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[dtype]
    arrays = {}
    for name, value in tiny_weights(cfg, seed=seed, mtp=mtp).items():
        a = mx.array(value)
        if a.dtype == mx.float32 and not keeps_float32(name):
            a = a.astype(target)
        arrays[name] = a
    cfg["torch_dtype"] = dtype
    cfg[RANDOM_WEIGHTS_KEY] = True
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "pt"})
    if mlx_lm:
        from .mlx_lm_files import mlx_lm_config, write_mlx_lm_files

        write_mlx_lm_files(out)
        cfg = mlx_lm_config(cfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
