"""Small random checkpoints in the official Hub layout, for tests and the demo.

They have V4's real structure (mHC, CSA/HCA with ratios 4 and 128, sliding
window 128, hash-routed first layers, YaRN compress RoPE) at toy widths.
"""

import json
from pathlib import Path

import numpy as np

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


def tiny_config(preset: str = "flash", **overrides) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; expected one of {sorted(PRESETS)}")
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["compress_ratios"] = list(PRESETS[preset])
    cfg.update(overrides)
    cfg["num_hidden_layers"] = len(cfg["compress_ratios"])
    cfg["num_hash_layers"] = min(cfg["num_hash_layers"], cfg["num_hidden_layers"])
    return cfg


def tiny_weights(cfg: dict, seed: int = 0, mtp: bool = True) -> dict:
    """Official-layout tensors as float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    D, V, H, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"], cfg["head_dim"]
    hc, E, inter = cfg["hc_mult"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    G, o_lora, q_lora = cfg["o_groups"], cfg["o_lora_rank"], cfg["q_lora_rank"]
    IH, Id = cfg["index_n_heads"], cfg["index_head_dim"]
    mix = (2 + hc) * hc

    def linear(out_dim, in_dim):
        return rng.normal(0, in_dim**-0.5, (out_dim, in_dim)).astype(np.float32)

    def norm(n):
        return (1 + rng.normal(0, 0.1, n)).astype(np.float32)

    def normal(shape, std):
        return rng.normal(0, std, shape).astype(np.float32)

    w = {
        "embed.weight": normal((V, D), 1.0),
        "head.weight": linear(V, D),
        "norm.weight": norm(D),
        "hc_head_fn": normal((hc, hc * D), 0.1),
        "hc_head_base": normal(hc, 0.5),
        "hc_head_scale": (1 + normal(1, 0.1)),
    }

    def compressor(prefix, width, ratio):
        c = 2 if ratio == 4 else 1
        w[f"{prefix}.wkv.weight"] = linear(c * width, D)
        w[f"{prefix}.wgate.weight"] = linear(c * width, D)
        w[f"{prefix}.ape"] = normal((ratio, c * width), 0.5)
        w[f"{prefix}.norm.weight"] = norm(width)

    for i, ratio in enumerate(cfg["compress_ratios"]):
        p = f"layers.{i}"
        w[f"{p}.attn_norm.weight"] = norm(D)
        w[f"{p}.ffn_norm.weight"] = norm(D)
        for part in ("attn", "ffn"):
            w[f"{p}.hc_{part}_fn"] = normal((mix, hc * D), 0.1)
            w[f"{p}.hc_{part}_base"] = normal(mix, 0.5)
            w[f"{p}.hc_{part}_scale"] = 1 + normal(3, 0.1)
        a = f"{p}.attn"
        w[f"{a}.wq_a.weight"] = linear(q_lora, D)
        w[f"{a}.q_norm.weight"] = norm(q_lora)
        w[f"{a}.wq_b.weight"] = linear(H * hd, q_lora)
        w[f"{a}.wkv.weight"] = linear(hd, D)
        w[f"{a}.kv_norm.weight"] = norm(hd)
        w[f"{a}.wo_a.weight"] = linear(G * o_lora, H * hd // G)
        w[f"{a}.wo_b.weight"] = linear(D, G * o_lora)
        w[f"{a}.attn_sink"] = normal(H, 1.0)
        if ratio:
            compressor(f"{a}.compressor", hd, ratio)
        if ratio == 4:
            w[f"{a}.indexer.wq_b.weight"] = linear(IH * Id, q_lora)
            w[f"{a}.indexer.weights_proj.weight"] = linear(IH, D)
            compressor(f"{a}.indexer.compressor", Id, 4)
        f = f"{p}.ffn"
        w[f"{f}.gate.weight"] = linear(E, D)
        if i < cfg["num_hash_layers"]:
            k = cfg["num_experts_per_tok"]
            w[f"{f}.gate.tid2eid"] = np.stack([rng.permutation(E)[:k] for _ in range(V)]).astype(np.int32)
        else:
            w[f"{f}.gate.bias"] = normal(E, 0.1)
        for e in range(E):
            w[f"{f}.experts.{e}.w1.weight"] = linear(inter, D)
            w[f"{f}.experts.{e}.w3.weight"] = linear(inter, D)
            w[f"{f}.experts.{e}.w2.weight"] = linear(D, inter)
        w[f"{f}.shared_experts.w1.weight"] = linear(inter, D)
        w[f"{f}.shared_experts.w3.weight"] = linear(inter, D)
        w[f"{f}.shared_experts.w2.weight"] = linear(D, inter)
    if mtp:
        w["mtp.0.enorm.weight"] = norm(D)
        w["mtp.0.hnorm.weight"] = norm(D)
        w["mtp.0.e_proj.weight"] = linear(D, D)
        w["mtp.0.h_proj.weight"] = linear(D, D)
    return w


FLOAT_KEEP_F32 = ("hc_", "attn_sink", ".ape", "norm.weight")


def write_tiny_checkpoint(out_dir, *, preset: str = "flash", seed: int = 0, dtype: str = "float32",
                          mtp: bool = True, **config_overrides) -> Path:
    """Write config.json + model.safetensors (official names, per-expert tensors)."""
    import mlx.core as mx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(preset, **config_overrides)
    target = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[dtype]
    arrays = {}
    for name, value in tiny_weights(cfg, seed=seed, mtp=mtp).items():
        a = mx.array(value)
        if a.dtype == mx.float32 and not any(k in name for k in FLOAT_KEEP_F32):
            a = a.astype(target)
        arrays[name] = a
    cfg["torch_dtype"] = dtype
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
