"""What a DeepSeek-V4 checkpoint must contain according to its config.json.

Official tensor names and shapes (V4_FORMAT.md section 3), the release's stored precision
of each (section 4), and which quantisation family a module belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConvertError

REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
            "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size", "vocab_size", "hc_mult")
LAYER_TYPE_RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4,
                    "heavily_compressed_attention": 128}


@dataclass
class Dims:
    D: int
    L: int
    H: int
    hd: int
    ql: int
    og: int
    ol: int
    E: int
    topk: int
    I: int
    shared: int
    V: int
    hc: int
    ih: int
    ihd: int
    ratios: list
    hash_layers: int
    mtp: int
    expert_fp4: bool


def dims(cfg: dict, source: str = "config.json") -> Dims:
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ConvertError(f"{source}: missing field(s) {', '.join(missing)}")
    L = int(cfg["num_hidden_layers"])
    mtp = int(cfg.get("num_nextn_predict_layers", 0) or 0)
    if "compress_ratios" in cfg:
        ratios = [int(r) for r in cfg["compress_ratios"]]
    elif "layer_types" in cfg:
        rates = dict(LAYER_TYPE_RATIO)
        for k, v in (cfg.get("compress_rates") or {}).items():
            rates[k] = int(v)
        bad = [t for t in cfg["layer_types"] if t not in rates]
        if bad:
            raise ConvertError(f"{source}: field layer_types has unknown entries {bad}")
        ratios = [rates[t] for t in cfg["layer_types"]]
    else:
        raise ConvertError(f"{source}: needs field compress_ratios (or layer_types)")
    if len(ratios) < L:
        raise ConvertError(f"{source}: field compress_ratios has {len(ratios)} entries for {L} layers")
    bad = [r for r in ratios if r not in (0, 4, 128)]
    if bad:
        raise ConvertError(f"{source}: field compress_ratios has unsupported ratios {bad} (0, 4 or 128)")
    if "num_hash_layers" in cfg:
        hash_layers = int(cfg["num_hash_layers"])
    elif "mlp_layer_types" in cfg:
        hash_layers = sum(1 for t in cfg["mlp_layer_types"] if t == "hash_moe")
    else:
        hash_layers = 0
    qc = cfg.get("quantization_config") or {}
    expert_dtype = cfg.get("expert_dtype", qc.get("expert_dtype"))
    ih = int(cfg.get("index_n_heads", cfg.get("index_heads", 64)))
    return Dims(D=int(cfg["hidden_size"]), L=L, H=int(cfg["num_attention_heads"]), hd=int(cfg["head_dim"]),
                ql=int(cfg["q_lora_rank"]), og=int(cfg["o_groups"]), ol=int(cfg["o_lora_rank"]),
                E=int(cfg["n_routed_experts"]), topk=int(cfg["num_experts_per_tok"]),
                I=int(cfg["moe_intermediate_size"]), shared=int(cfg.get("n_shared_experts", 1)),
                V=int(cfg["vocab_size"]), hc=int(cfg["hc_mult"]), ih=ih,
                ihd=int(cfg.get("index_head_dim", 128)), ratios=ratios, hash_layers=hash_layers,
                mtp=mtp, expert_fp4=(expert_dtype == "fp4"))


# Module families: decide how recipes treat a module.
EMBED, HEAD, EXPERT, DENSE, AUX = "embed", "head", "expert", "dense", "aux"

_LAYER = r"(?P<prefix>(?:layers|mtp)\.\d+)\."
_FAMILY_RULES = [
    (re.compile(r"^embed$"), EMBED),
    (re.compile(r"^head$"), HEAD),
    (re.compile(_LAYER + r"ffn\.experts\.(w1|w2|w3)$"), EXPERT),
    (re.compile(_LAYER + r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b)$"), DENSE),
    (re.compile(_LAYER + r"attn\.indexer\.wq_b$"), DENSE),
    (re.compile(_LAYER + r"ffn\.shared_experts\.(w1|w2|w3)$"), DENSE),
    (re.compile(r"^mtp\.\d+\.(e_proj|h_proj)$"), DENSE),
    (re.compile(_LAYER + r"attn\.(indexer\.)?compressor\.(wkv|wgate)$"), AUX),
    (re.compile(_LAYER + r"attn\.indexer\.weights_proj$"), AUX),
]

_EXPERT_RE = re.compile(r"^(?P<prefix>(?:layers|mtp)\.\d+\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_KEEP_F32_RE = re.compile(r"(^|\.)hc_[a-z_]+$|(^|\.)attn_sink$|\.ape$|(^|\.)[a-z_]*norm\.weight$|\.gate\.bias$")


def module_family(module: str):
    for rx, fam in _FAMILY_RULES:
        if rx.match(module):
            return fam
    return None


def keeps_float32(name: str) -> bool:
    """mHC, sinks, ape, norms and the router bias stay float32 in every recipe."""
    return bool(_KEEP_F32_RE.search(name))


def expert_parts(name: str):
    """'layers.3.ffn.experts.17.w2.weight' -> ('layers.3.ffn.experts', 17, 'w2') or None."""
    m = _EXPERT_RE.match(name)
    return (m["prefix"], int(m["e"]), m["w"]) if m else None


def is_mtp(name: str) -> bool:
    return name.startswith("mtp.")


def _block_shapes(d: Dims, prefix: str, ratio: int, hashed: bool, experts: bool = True) -> dict:
    D, hc = d.D, d.hc
    mix = (2 + hc) * hc
    s = {
        "attn_norm.weight": (D,), "ffn_norm.weight": (D,),
        "hc_attn_fn": (mix, hc * D), "hc_ffn_fn": (mix, hc * D),
        "hc_attn_base": (mix,), "hc_ffn_base": (mix,), "hc_attn_scale": (3,), "hc_ffn_scale": (3,),
        "attn.wq_a.weight": (d.ql, D), "attn.q_norm.weight": (d.ql,),
        "attn.wq_b.weight": (d.H * d.hd, d.ql), "attn.wkv.weight": (d.hd, D),
        "attn.kv_norm.weight": (d.hd,), "attn.wo_a.weight": (d.og * d.ol, d.H * d.hd // d.og),
        "attn.wo_b.weight": (D, d.og * d.ol), "attn.attn_sink": (d.H,),
        "ffn.gate.weight": (d.E, D),
        "ffn.shared_experts.w1.weight": (d.I * d.shared, D),
        "ffn.shared_experts.w3.weight": (d.I * d.shared, D),
        "ffn.shared_experts.w2.weight": (D, d.I * d.shared),
    }
    if hashed:
        s["ffn.gate.tid2eid"] = (d.V, d.topk)
    else:
        s["ffn.gate.bias"] = (d.E,)
    if ratio:
        c = 2 if ratio == 4 else 1
        s.update({"attn.compressor.wkv.weight": (c * d.hd, D), "attn.compressor.wgate.weight": (c * d.hd, D),
                  "attn.compressor.ape": (ratio, c * d.hd), "attn.compressor.norm.weight": (d.hd,)})
    if ratio == 4:
        s.update({"attn.indexer.wq_b.weight": (d.ih * d.ihd, d.ql),
                  "attn.indexer.weights_proj.weight": (d.ih, D),
                  "attn.indexer.compressor.wkv.weight": (2 * d.ihd, D),
                  "attn.indexer.compressor.wgate.weight": (2 * d.ihd, D),
                  "attn.indexer.compressor.ape": (4, 2 * d.ihd),
                  "attn.indexer.compressor.norm.weight": (d.ihd,)})
    if experts:
        for e in range(d.E):
            s[f"ffn.experts.{e}.w1.weight"] = (d.I, D)
            s[f"ffn.experts.{e}.w3.weight"] = (d.I, D)
            s[f"ffn.experts.{e}.w2.weight"] = (D, d.I)
    return {f"{prefix}.{k}": v for k, v in s.items()}


def _mtp_shapes(d: Dims, j: int) -> dict:
    p = f"mtp.{j}"
    ratio = d.ratios[d.L + j] if len(d.ratios) > d.L + j else 0
    s = _block_shapes(d, p, ratio, hashed=False)
    s.update({f"{p}.e_proj.weight": (d.D, d.D), f"{p}.h_proj.weight": (d.D, d.D),
              f"{p}.enorm.weight": (d.D,), f"{p}.hnorm.weight": (d.D,), f"{p}.norm.weight": (d.D,),
              f"{p}.hc_head_fn": (d.hc, d.hc * d.D), f"{p}.hc_head_base": (d.hc,),
              f"{p}.hc_head_scale": (1,)})
    return s


def expected_shapes(d: Dims, include_mtp: bool = True) -> dict:
    """Official name -> logical (dequantised) shape, for the decoder and, optionally, MTP."""
    s = {"embed.weight": (d.V, d.D), "head.weight": (d.V, d.D), "norm.weight": (d.D,),
         "hc_head_fn": (d.hc, d.hc * d.D), "hc_head_base": (d.hc,), "hc_head_scale": (1,)}
    for i in range(d.L):
        s.update(_block_shapes(d, f"layers.{i}", d.ratios[i], hashed=i < d.hash_layers))
    if include_mtp:
        for j in range(d.mtp):
            s.update(_mtp_shapes(d, j))
    return s


def release_storage(name: str, shape: tuple, d: Dims):
    """Stored precision of an official tensor in the Hub release: 'fp8', 'fp4', or a float/int dtype."""
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    fam = module_family(module) if module else None
    if expert_parts(name) or fam == EXPERT:
        return "fp4" if d.expert_fp4 else "fp8"
    if fam == DENSE:
        return "fp8"
    if name.endswith("tid2eid"):
        return "I32"
    if keeps_float32(name):
        return "F32"
    return "BF16"
