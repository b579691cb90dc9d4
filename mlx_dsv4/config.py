"""Model hyper-parameters read from a checkpoint's config.json.

Both the official checkpoint keys and the transformers-style keys
(`layer_types`, `compress_rates`, `mlp_layer_types`, `partial_rotary_factor`,
nested `rope_parameters`) are accepted; invalid values raise ConfigError naming
the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

COMPRESS_RATIOS = (0, 4, 128)
LAYER_TYPE_RATIO_KEYS = {
    "sliding_attention": None,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid")


class ConfigError(ValueError):
    """A config.json field is missing or has a value the model cannot run."""


@dataclass
class ModelArgs:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    compress_ratios: list = field(default_factory=list)
    num_hash_layers: int = 3
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: Optional[dict] = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: Any = 1
    tie_word_embeddings: bool = False

    @property
    def yarn(self) -> Optional[dict]:
        rs = self.rope_scaling
        if rs and rs.get("rope_type", rs.get("type")) == "yarn":
            return rs
        return None

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelArgs":
        cfg = dict(raw)
        _fold_transformers_keys(cfg)
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in cfg.items() if k in known})
        if not args.compress_ratios:
            raise ConfigError(
                "config has neither `compress_ratios` nor `layer_types`: the per-layer attention schedule is required"
            )
        args.compress_ratios = [int(r) for r in args.compress_ratios]
        args.validate()
        if args.yarn is not None:
            rs = args.rope_scaling
            args.rope_scaling = {
                "type": "yarn",
                "factor": rs["factor"],
                "original_max_position_embeddings": rs["original_max_position_embeddings"],
                "beta_fast": rs.get("beta_fast") or 32,
                "beta_slow": rs.get("beta_slow") or 1,
            }
        return args

    @classmethod
    def from_path(cls, path) -> "ModelArgs":
        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        try:
            raw = json.loads(config_file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{config_file}: not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file}: invalid JSON ({e})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{config_file}: {e}") from None

    def validate(self) -> None:
        def bad(name, value, why):
            raise ConfigError(f"`{name}` = {value!r}: {why}")

        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
            "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size", "sliding_window", "hc_mult", "hc_sinkhorn_iters",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, v, "must be a positive integer")
        if self.num_key_value_heads != 1:
            bad("num_key_value_heads", self.num_key_value_heads, "DeepSeek-V4 uses one shared KV head (MQA); must be 1")
        if len(self.compress_ratios) != self.num_hidden_layers:
            bad(
                "compress_ratios", self.compress_ratios,
                f"has {len(self.compress_ratios)} entries but num_hidden_layers is {self.num_hidden_layers}",
            )
        for i, r in enumerate(self.compress_ratios):
            if r not in COMPRESS_RATIOS:
                bad(f"compress_ratios[{i}]", r, f"unknown compress ratio; expected one of {COMPRESS_RATIOS}")
        rd = self.qk_rope_head_dim
        if not isinstance(rd, int) or rd <= 0 or rd % 2:
            bad("qk_rope_head_dim", rd, "must be a positive even integer")
        if rd > self.head_dim:
            bad("qk_rope_head_dim", rd, f"rope dims exceed head_dim ({self.head_dim})")
        if 4 in self.compress_ratios and rd > self.index_head_dim:
            bad("qk_rope_head_dim", rd, f"rope dims exceed index_head_dim ({self.index_head_dim})")
        if self.num_attention_heads % self.o_groups:
            bad("o_groups", self.o_groups, f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", self.scoring_func, f"unknown scoring function; expected one of {SCORING_FUNCS}")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", self.num_experts_per_tok, f"exceeds n_routed_experts ({self.n_routed_experts})")
        if not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            bad("num_hash_layers", self.num_hash_layers, f"must be in [0, {self.num_hidden_layers}]")
        if self.n_shared_experts not in (0, 1):
            bad("n_shared_experts", self.n_shared_experts, "only 0 or 1 shared expert is supported")
        if 4 in self.compress_ratios:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                v = getattr(self, name)
                if not isinstance(v, int) or v <= 0:
                    bad(name, v, "must be a positive integer for ratio-4 (CSA) layers")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict):
                bad("rope_scaling", rs, "must be an object")
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("yarn", "default", None):
                bad("rope_scaling.type", kind, "only YaRN (or no scaling) is supported")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if not isinstance(rs.get(key), (int, float)) or rs[key] <= 0:
                        bad(f"rope_scaling.{key}", rs.get(key), "YaRN needs a positive number")


def _fold_transformers_keys(cfg: dict) -> None:
    """Rewrite transformers-style keys into the official ones, in place."""
    rates = cfg.pop("compress_rates", None) or {}
    if not isinstance(rates, dict):
        raise ConfigError(f"`compress_rates` = {rates!r}: must be an object keyed by layer type")
    ratio_of = {"sliding_attention": 0}
    for name, default in LAYER_TYPE_RATIO_KEYS.items():
        if default is not None:
            ratio_of[name] = rates.get(name, default)
    layer_types = cfg.pop("layer_types", None)
    if layer_types is not None:
        ratios = []
        for i, t in enumerate(layer_types):
            if t not in ratio_of:
                raise ConfigError(f"`layer_types[{i}]` = {t!r}: unknown layer type; expected one of {list(ratio_of)}")
            ratios.append(ratio_of[t])
        if "compress_ratios" in cfg and [int(r) for r in cfg["compress_ratios"]] != ratios:
            raise ConfigError("`layer_types` and `compress_ratios` disagree")
        cfg["compress_ratios"] = ratios

    mlp_types = cfg.pop("mlp_layer_types", None)
    if mlp_types is not None:
        for i, t in enumerate(mlp_types):
            if t not in ("hash_moe", "moe"):
                raise ConfigError(f"`mlp_layer_types[{i}]` = {t!r}: expected 'hash_moe' or 'moe'")
        n_hash = sum(t == "hash_moe" for t in mlp_types)
        if any(t != "hash_moe" for t in mlp_types[:n_hash]):
            raise ConfigError("`mlp_layer_types`: hash_moe layers must come first")
        cfg["num_hash_layers"] = n_hash

    prf = cfg.pop("partial_rotary_factor", None)
    if prf is not None and "qk_rope_head_dim" not in cfg:
        cfg["qk_rope_head_dim"] = int(cfg.get("head_dim", 512) * prf)

    rp = cfg.pop("rope_parameters", None)
    if isinstance(rp, dict):
        main, compress = rp.get("main"), rp.get("compress")
        if isinstance(main, dict) and isinstance(compress, dict):
            if "rope_theta" in main:
                cfg["rope_theta"] = main["rope_theta"]
            if "rope_theta" in compress:
                cfg["compress_rope_theta"] = compress["rope_theta"]
            scaling = {k: v for k, v in compress.items() if k not in ("rope_theta", "partial_rotary_factor")}
        else:
            scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
            if "rope_theta" in rp:
                cfg.setdefault("rope_theta", rp["rope_theta"])
        if scaling.get("rope_type", scaling.get("type")) == "yarn" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = scaling
