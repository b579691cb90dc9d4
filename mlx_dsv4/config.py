"""Model hyper-parameters read from a checkpoint's config.json: the one place config keys are parsed.

Both the official checkpoint keys and the transformers-style keys (`layer_types`,
`compress_rates`, `mlp_layer_types`, `partial_rotary_factor`, nested `rope_parameters`)
are accepted and folded into one set of fields; every invalid value raises ConfigError
naming the field and the value, before anything is allocated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

COMPRESS_RATIOS = (0, 4, 128)
LAYER_TYPE_RATIO = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid")
EXPERT_DTYPES = ("fp4", "fp8")
# Fields whose defaults would silently give a different model: a config must state them.
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
                "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
                "moe_intermediate_size", "vocab_size", "hc_mult")
# Other names for official fields, as written by some exports.
ALIASES = {"index_heads": "index_n_heads"}
# Integer fields: (smallest, largest) accepted. The upper bounds are far beyond any released model and
# stop absurd values before they turn into allocations.
INT_BOUNDS = {
    "vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 16), "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 4096), "num_key_value_heads": (1, 1), "head_dim": (1, 1 << 14),
    "qk_rope_head_dim": (2, 1 << 14), "q_lora_rank": (1, 1 << 16), "o_groups": (1, 4096),
    "o_lora_rank": (1, 1 << 16), "n_routed_experts": (1, 1 << 14), "n_shared_experts": (0, 1),
    "num_experts_per_tok": (1, 1 << 14), "moe_intermediate_size": (1, 1 << 18),
    "num_hash_layers": (0, 1024), "sliding_window": (1, 1 << 20), "index_n_heads": (1, 4096),
    "index_head_dim": (1, 1 << 14), "index_topk": (1, 1 << 24), "hc_mult": (1, 64),
    "hc_sinkhorn_iters": (1, 10_000), "max_position_embeddings": (1, 1 << 34),
    "num_nextn_predict_layers": (0, 16), "bos_token_id": (0, 1 << 24),
}
POSITIVE_FLOATS = ("routed_scaling_factor", "swiglu_limit", "hc_eps", "rope_theta", "compress_rope_theta",
                   "rms_norm_eps")
BOOLS = ("norm_topk_prob", "tie_word_embeddings")
# The DSpark keys that only mean something with `dspark_block_size`.
DSPARK_FIELDS = ("dspark_target_layer_ids", "dspark_noise_token_id")
MAX_PARAMETERS = 10**14  # 60x V4-Pro: a larger config is a typo, not a model


class ConfigError(ValueError):
    """A config.json field is missing or has a value the model cannot run."""


def _bad(name, value, why):
    raise ConfigError(f"`{name}` = {value!r}: {why}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    compress_ratios: list = field(default_factory=list)  # one per decoder layer
    mtp_compress_ratios: list = field(default_factory=list)  # one per MTP layer (0 when the config has none)
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
    expert_dtype: Optional[str] = None  # stored precision of the release's routed experts
    # DSpark drafter (V4-Flash-0731): set when the mtp.* stages are a DSpark drafter, not MTP layers
    dspark_block_size: Optional[int] = None  # drafts proposed per drafter pass, at most
    dspark_target_layer_ids: Optional[list] = None  # decoder layers whose outputs the drafter reads
    dspark_noise_token_id: Optional[int] = None  # the mask token filling the drafted block
    dspark_markov_rank: int = 256

    @property
    def has_dspark(self) -> bool:
        return self.dspark_block_size is not None

    @property
    def yarn(self) -> Optional[dict]:
        rs = self.rope_scaling
        if rs and rs.get("rope_type", rs.get("type")) == "yarn":
            return rs
        return None

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelArgs":
        if not isinstance(raw, dict):
            raise ConfigError(f"the config must be a JSON object, got {type(raw).__name__}")
        cfg = fold_config(raw)
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in cfg.items() if k in known})
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
        config_file = config_path(path)
        try:
            return cls.from_dict(read_config(config_file))
        except ConfigError as e:
            if str(e).startswith(str(config_file)):
                raise
            raise ConfigError(f"{config_file}: {e}") from None

    def validate(self) -> None:
        for name, (low, high) in INT_BOUNDS.items():
            v = getattr(self, name)
            if name == "bos_token_id" and v is None:
                continue
            if name == "num_key_value_heads" and v != 1:
                _bad(name, v, "DeepSeek-V4 uses one shared KV head (MQA); must be 1")
            if not _is_int(v) or not low <= v <= high:
                _bad(name, v, f"must be an integer in [{low}, {high}]")
        for name in POSITIVE_FLOATS:
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                _bad(name, v, "must be a finite positive number")
        for name in BOOLS:
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "must be true or false")
        eos = self.eos_token_id
        if not (_is_int(eos) or (isinstance(eos, list) and eos and all(_is_int(t) for t in eos))):
            _bad("eos_token_id", eos, "must be a token id or a non-empty list of token ids")
        if self.expert_dtype is not None and self.expert_dtype not in EXPERT_DTYPES:
            _bad("expert_dtype", self.expert_dtype, f"expected one of {EXPERT_DTYPES}")
        self._validate_schedule()
        rd = self.qk_rope_head_dim
        if rd % 2:
            _bad("qk_rope_head_dim", rd, "must be a positive even integer")
        if rd > self.head_dim:
            _bad("qk_rope_head_dim", rd, f"rope dims exceed head_dim ({self.head_dim})")
        if 4 in self.compress_ratios and rd > self.index_head_dim:
            _bad("qk_rope_head_dim", rd, f"rope dims exceed index_head_dim ({self.index_head_dim})")
        if self.num_attention_heads % self.o_groups:
            _bad("o_groups", self.o_groups, f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.scoring_func not in SCORING_FUNCS:
            _bad("scoring_func", self.scoring_func, f"unknown scoring function; expected one of {SCORING_FUNCS}")
        if self.num_experts_per_tok > self.n_routed_experts:
            _bad("num_experts_per_tok", self.num_experts_per_tok, f"exceeds n_routed_experts ({self.n_routed_experts})")
        if self.num_hash_layers > self.num_hidden_layers:
            _bad("num_hash_layers", self.num_hash_layers, f"must be in [0, {self.num_hidden_layers}]")
        self._validate_rope_scaling()
        self._validate_dspark()
        n = self.parameter_count()
        if n > MAX_PARAMETERS:
            raise ConfigError(f"the config describes {n:.3g} parameters, over the {MAX_PARAMETERS:.0e} this "
                              "tool accepts: check hidden_size, n_routed_experts, moe_intermediate_size and "
                              "num_hidden_layers")

    def _validate_schedule(self) -> None:
        for name, ratios in (("compress_ratios", self.compress_ratios),
                             ("mtp_compress_ratios", self.mtp_compress_ratios)):
            if not isinstance(ratios, list):
                _bad(name, ratios, "must be a list with one compress ratio per layer")
            for i, r in enumerate(ratios):
                if not _is_int(r) or r not in COMPRESS_RATIOS:
                    _bad(f"{name}[{i}]", r, f"unknown compress ratio; expected one of {COMPRESS_RATIOS}")
        L, n_mtp = self.num_hidden_layers, self.num_nextn_predict_layers
        if len(self.compress_ratios) != L:
            _bad("compress_ratios", self.compress_ratios,
                 f"has {len(self.compress_ratios)} entries but num_hidden_layers is {L}"
                 + (f" (or {L + n_mtp} with the MTP layers)" if n_mtp else ""))
        if len(self.mtp_compress_ratios) != n_mtp:
            _bad("mtp_compress_ratios", self.mtp_compress_ratios,
                 f"has {len(self.mtp_compress_ratios)} entries but num_nextn_predict_layers is {n_mtp}")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            _bad("rope_scaling", rs, "must be an object")
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ("yarn", "default", None):
            _bad("rope_scaling.type", kind, "only YaRN (or no scaling) is supported")
        if kind == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if not _is_number(rs.get(key)) or rs[key] <= 0:
                    _bad(f"rope_scaling.{key}", rs.get(key), "YaRN needs a positive number")
            for key in ("beta_fast", "beta_slow"):
                if rs.get(key) is not None and not _is_number(rs[key]):
                    _bad(f"rope_scaling.{key}", rs[key], "must be a finite number")

    def _validate_dspark(self) -> None:
        given = [k for k in DSPARK_FIELDS if getattr(self, k) is not None]
        if self.dspark_block_size is None:
            if given:
                _bad(given[0], getattr(self, given[0]), "a DSpark drafter also needs `dspark_block_size`")
            return
        if self.dspark_noise_token_id is None:
            self.dspark_noise_token_id = 0  # what the public drafter implementation assumes when absent
        for name, (low, high) in (("dspark_block_size", (1, 64)), ("dspark_markov_rank", (1, 1 << 16)),
                                  ("dspark_noise_token_id", (0, self.vocab_size - 1))):
            v = getattr(self, name)
            if not _is_int(v) or not low <= v <= high:
                _bad(name, v, f"must be an integer in [{low}, {high}]")
        ids = self.dspark_target_layer_ids
        if not isinstance(ids, list) or not ids:
            _bad("dspark_target_layer_ids", ids, "must be a non-empty list of decoder layer indices")
        for i, layer in enumerate(ids):
            if not _is_int(layer) or not 0 <= layer < self.num_hidden_layers:
                _bad(f"dspark_target_layer_ids[{i}]", layer,
                     f"must be a decoder layer index in [0, {self.num_hidden_layers - 1}]")
        if len(set(ids)) != len(ids):
            _bad("dspark_target_layer_ids", ids, "lists a layer more than once")
        if self.num_nextn_predict_layers < 1:
            _bad("num_nextn_predict_layers", self.num_nextn_predict_layers,
                 "a DSpark drafter has at least one stage (mtp.0)")

    def parameter_count(self) -> int:
        """Parameters of the decoder (routed experts, attention and embeddings; a close upper estimate)."""
        D, L, E = self.hidden_size, self.num_hidden_layers + self.num_nextn_predict_layers, self.n_routed_experts
        ffn = (E + self.n_shared_experts) * 3 * self.moe_intermediate_size * D
        attn = (self.q_lora_rank * (D + self.num_attention_heads * self.head_dim) + 2 * self.head_dim * D
                + self.num_attention_heads * self.head_dim * self.o_lora_rank + self.o_groups * self.o_lora_rank * D
                + 2 * self.hc_mult * self.hc_mult * D * (2 + self.hc_mult))
        return L * (ffn + attn + E * D) + 2 * self.vocab_size * D


def config_path(path) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def read_config(path) -> dict:
    """The JSON object in a config file (or a checkpoint directory's config.json)."""
    path = config_path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a JSON object, got {type(raw).__name__}")
    return raw


def fold_config(raw: dict) -> dict:
    """Official-key view of a config: transformers-style keys and aliases rewritten, the attention
    schedule split into decoder and MTP layers, and the release's expert precision lifted out of
    `quantization_config`."""
    cfg = dict(raw)
    for alias, name in ALIASES.items():
        if alias in cfg:
            value = cfg.pop(alias)
            if name in cfg and cfg[name] != value:
                raise ConfigError(f"`{alias}` = {value!r} and `{name}` = {cfg[name]!r} disagree")
            cfg[name] = value
    missing = [k for k in SHAPE_FIELDS if k not in cfg]
    if missing:
        raise ConfigError(f"missing field(s) {', '.join(missing)}")
    _fold_layer_types(cfg)
    _fold_mlp_layer_types(cfg)
    _fold_rope(cfg)
    _split_mtp_ratios(cfg)
    if "dspark_markov_rank" in cfg and cfg["dspark_markov_rank"] is None:
        del cfg["dspark_markov_rank"]
    qc = cfg.get("quantization_config")
    if "expert_dtype" not in cfg and isinstance(qc, dict) and "expert_dtype" in qc:
        cfg["expert_dtype"] = qc["expert_dtype"]
    return cfg


def _fold_layer_types(cfg: dict) -> None:
    rates = cfg.pop("compress_rates", None) or {}
    if not isinstance(rates, dict):
        _bad("compress_rates", rates, "must be an object keyed by layer type")
    ratio_of = dict(LAYER_TYPE_RATIO)
    for name, value in rates.items():
        if name not in ratio_of:
            _bad(f"compress_rates.{name}", value, f"unknown layer type; expected one of {list(ratio_of)}")
        ratio_of[name] = value
    layer_types = cfg.pop("layer_types", None)
    if layer_types is None:
        if "compress_ratios" not in cfg:
            raise ConfigError("config has neither `compress_ratios` nor `layer_types`: "
                              "the per-layer attention schedule is required")
        return
    if not isinstance(layer_types, list):
        _bad("layer_types", layer_types, "must be a list of layer type names")
    ratios = []
    for i, t in enumerate(layer_types):
        if not isinstance(t, str) or t not in ratio_of:
            _bad(f"layer_types[{i}]", t, f"unknown layer type; expected one of {list(ratio_of)}")
        ratios.append(ratio_of[t])
    given = cfg.get("compress_ratios")
    if given is not None and not isinstance(given, list):
        _bad("compress_ratios", given, "must be a list with one compress ratio per layer")
    if given is not None and given != ratios and given[: len(ratios)] != ratios:
        raise ConfigError(f"`layer_types` and `compress_ratios` disagree: {ratios} vs {given}")
    if given is None:
        cfg["compress_ratios"] = ratios


def _fold_mlp_layer_types(cfg: dict) -> None:
    mlp_types = cfg.pop("mlp_layer_types", None)
    if mlp_types is None:
        return
    if not isinstance(mlp_types, list):
        _bad("mlp_layer_types", mlp_types, "must be a list of 'hash_moe' / 'moe'")
    for i, t in enumerate(mlp_types):
        if t not in ("hash_moe", "moe"):
            _bad(f"mlp_layer_types[{i}]", t, "expected 'hash_moe' or 'moe'")
    n_hash = sum(t == "hash_moe" for t in mlp_types)
    if any(t != "hash_moe" for t in mlp_types[:n_hash]):
        raise ConfigError("`mlp_layer_types`: hash_moe layers must come first")
    if "num_hash_layers" in cfg and cfg["num_hash_layers"] != n_hash:
        raise ConfigError(f"`mlp_layer_types` ({n_hash} hash layers) and `num_hash_layers` = "
                          f"{cfg['num_hash_layers']!r} disagree")
    cfg["num_hash_layers"] = n_hash


def _fold_rope(cfg: dict) -> None:
    prf = cfg.pop("partial_rotary_factor", None)
    if prf is not None and "qk_rope_head_dim" not in cfg:
        if not _is_number(prf) or not 0 < prf <= 1:
            _bad("partial_rotary_factor", prf, "must be a number in (0, 1]")
        head_dim = cfg.get("head_dim")
        if not _is_int(head_dim):
            _bad("head_dim", head_dim, "must be an integer")
        cfg["qk_rope_head_dim"] = int(head_dim * prf)
    rp = cfg.pop("rope_parameters", None)
    if rp is None:
        return
    if not isinstance(rp, dict):
        _bad("rope_parameters", rp, "must be an object")
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


def _split_mtp_ratios(cfg: dict) -> None:
    """`compress_ratios` may list the MTP layers' ratios after the decoder's; keep them apart."""
    ratios = cfg.get("compress_ratios")
    if not isinstance(ratios, list):
        _bad("compress_ratios", ratios, "must be a list with one compress ratio per layer")
    L, n_mtp = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers", 1)
    if _is_int(L) and _is_int(n_mtp) and n_mtp > 0 and len(ratios) == L + n_mtp:
        cfg["compress_ratios"], cfg["mtp_compress_ratios"] = ratios[:L], ratios[L:]
    elif _is_int(n_mtp) and 0 <= n_mtp <= INT_BOUNDS["num_nextn_predict_layers"][1]:
        cfg.setdefault("mtp_compress_ratios", [0] * n_mtp)
