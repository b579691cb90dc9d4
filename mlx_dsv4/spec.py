"""The DeepSeek-V4 checkpoint contract, derived from ModelArgs: the one list of tensors.

- `official_tensors`: every tensor of the Hub release's layout (per-expert routed weights,
  2-D `wo_a`), decoder and MTP layers, with its logical (dequantised) shape, in a fixed order;
- `mlx_tensors`: the same in the MLX layout that the converter writes and the Model holds
  (routed experts stacked per projection, `wo_a` split by output group);
- `official_to_mlx`: how one official tensor lands in the MLX layout;
- `keeps_float32`, `release_storage`, `module_family`: precisions of the release and of every
  recipe, and the quantisation family of each linear module.

The loader, the converter (plan, verify, estimate), the tiny-checkpoint writer and the Model's
layer choices (hash routing, compressor widths, indexer) all read it from here.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

from .config import ModelArgs

Shape = Tuple[int, ...]

# Quantisation families: how recipes treat a linear module.
EMBED, HEAD, EXPERT, DENSE, AUX = "embed", "head", "expert", "dense", "aux"

_LAYER = r"(?P<prefix>(?:layers|mtp)\.\d+)\."
_FAMILY_RULES = [
    (re.compile(r"^embed$"), EMBED),
    (re.compile(r"^head$"), HEAD),
    (re.compile(_LAYER + r"ffn\.experts\.(w1|w2|w3)$"), EXPERT),
    (re.compile(_LAYER + r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b)$"), DENSE),
    (re.compile(_LAYER + r"attn\.indexer\.wq_b$"), DENSE),
    (re.compile(_LAYER + r"ffn\.shared_experts\.(w1|w2|w3)$"), DENSE),
    (re.compile(r"^mtp\.\d+\.(e_proj|h_proj|main_proj)$"), DENSE),
    (re.compile(_LAYER + r"attn\.(indexer\.)?compressor\.(wkv|wgate)$"), AUX),
    (re.compile(_LAYER + r"attn\.indexer\.weights_proj$"), AUX),
]
_EXPERT_RE = re.compile(r"^(?P<prefix>(?:layers|mtp)\.\d+\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_KEEP_F32_RE = re.compile(r"(^|\.)hc_[a-z_]+$|(^|\.)attn_sink$|\.ape$|(^|\.)[a-z_]*norm\.weight$|\.gate\.bias$")


def is_hash_layer(args: ModelArgs, layer_id: int) -> bool:
    """The first `num_hash_layers` decoder layers route by token id (`ffn.gate.tid2eid`)."""
    return layer_id < args.num_hash_layers


def compressor_width(ratio: int, head_dim: int) -> int:
    """Ratio-4 compressors project two halves per token (overlapping windows); ratio 128, one."""
    return head_dim * (2 if ratio == 4 else 1)


def has_indexer(ratio: int) -> bool:
    return ratio == 4


def mix_width(args: ModelArgs) -> int:
    """Outputs of one mHC mixing projection: pre (hc), post (hc) and comb (hc * hc)."""
    return (2 + args.hc_mult) * args.hc_mult


def _compressor(prefix: str, ratio: int, width: int, D: int) -> Dict[str, Shape]:
    c = compressor_width(ratio, width)
    return {f"{prefix}.wkv.weight": (c, D), f"{prefix}.wgate.weight": (c, D),
            f"{prefix}.ape": (ratio, c), f"{prefix}.norm.weight": (width,)}


def _block(args: ModelArgs, prefix: str, ratio: int, hashed: bool) -> Dict[str, Shape]:
    D, hc, hd, H = args.hidden_size, args.hc_mult, args.head_dim, args.num_attention_heads
    G, I = args.o_groups, args.moe_intermediate_size
    mix = mix_width(args)
    s = {"attn_norm.weight": (D,), "ffn_norm.weight": (D,)}
    for part in ("attn", "ffn"):
        s.update({f"hc_{part}_fn": (mix, hc * D), f"hc_{part}_base": (mix,), f"hc_{part}_scale": (3,)})
    s.update({
        "attn.wq_a.weight": (args.q_lora_rank, D), "attn.q_norm.weight": (args.q_lora_rank,),
        "attn.wq_b.weight": (H * hd, args.q_lora_rank), "attn.wkv.weight": (hd, D),
        "attn.kv_norm.weight": (hd,), "attn.wo_a.weight": (G * args.o_lora_rank, H * hd // G),
        "attn.wo_b.weight": (D, G * args.o_lora_rank), "attn.attn_sink": (H,),
    })
    if ratio:
        s.update(_compressor("attn.compressor", ratio, hd, D))
    if has_indexer(ratio):
        ih, ihd = args.index_n_heads, args.index_head_dim
        s.update({"attn.indexer.wq_b.weight": (ih * ihd, args.q_lora_rank),
                  "attn.indexer.weights_proj.weight": (ih, D)})
        s.update(_compressor("attn.indexer.compressor", ratio, ihd, D))
    s["ffn.gate.weight"] = (args.n_routed_experts, D)
    if hashed:
        s["ffn.gate.tid2eid"] = (args.vocab_size, args.num_experts_per_tok)
    else:
        s["ffn.gate.bias"] = (args.n_routed_experts,)
    for e in range(args.n_routed_experts):
        s.update({f"ffn.experts.{e}.w1.weight": (I, D), f"ffn.experts.{e}.w3.weight": (I, D),
                  f"ffn.experts.{e}.w2.weight": (D, I)})
    if args.n_shared_experts:
        s.update({"ffn.shared_experts.w1.weight": (I, D), "ffn.shared_experts.w3.weight": (I, D),
                  "ffn.shared_experts.w2.weight": (D, I)})
    return {f"{prefix}.{k}": v for k, v in s.items()}


def _head(args: ModelArgs, prefix: str = "") -> Dict[str, Shape]:
    D, hc = args.hidden_size, args.hc_mult
    return {f"{prefix}norm.weight": (D,), f"{prefix}hc_head_fn": (hc, hc * D),
            f"{prefix}hc_head_base": (hc,), f"{prefix}hc_head_scale": (1,)}


def mtp_layer_tensors(args: ModelArgs, j: int) -> Dict[str, Shape]:
    """MTP layer j: a learned-routing block plus its input projections, norms and own mHC head."""
    D, p = args.hidden_size, f"mtp.{j}"
    s = _block(args, p, args.mtp_compress_ratios[j], hashed=False)
    s.update({f"{p}.e_proj.weight": (D, D), f"{p}.h_proj.weight": (D, D),
              f"{p}.enorm.weight": (D,), f"{p}.hnorm.weight": (D,)})
    s.update(_head(args, f"{p}."))
    return s


def dspark_stage_tensors(args: ModelArgs, s: int) -> Dict[str, Shape]:
    """DSpark stage s (a config with `dspark_block_size`): a learned-routing, sliding-window block;
    stage 0 also projects the tapped decoder outputs (`main_proj`, `main_norm`), the last stage
    holds the mHC head, the norm and the drafter's low-rank Markov head."""
    D, V, p = args.hidden_size, args.vocab_size, f"mtp.{s}"
    out = _block(args, p, 0, hashed=False)
    if s == 0:
        out.update({f"{p}.main_proj.weight": (D, D * len(args.dspark_target_layer_ids)),
                    f"{p}.main_norm.weight": (D,)})
    if s == args.num_nextn_predict_layers - 1:
        out.update(_head(args, f"{p}."))
        r = args.dspark_markov_rank
        out.update({f"{p}.markov_head.markov_w1.weight": (V, r), f"{p}.markov_head.markov_w2.weight": (V, r)})
    return out


def official_tensors(args: ModelArgs, *, mtp: bool = True) -> Dict[str, Shape]:
    """Official name -> logical shape, in a fixed order: top level, decoder layers, then MTP layers
    (or the DSpark drafter's stages, which the checkpoint keeps under the same mtp.* names)."""
    D = args.hidden_size
    s = {"embed.weight": (args.vocab_size, D)}
    if not args.tie_word_embeddings:  # tied: the head reads embed.weight
        s["head.weight"] = (args.vocab_size, D)
    s.update(_head(args))
    for i, ratio in enumerate(args.compress_ratios):
        s.update(_block(args, f"layers.{i}", ratio, hashed=is_hash_layer(args, i)))
    if mtp:
        layer_tensors = dspark_stage_tensors if args.has_dspark else mtp_layer_tensors
        for j in range(args.num_nextn_predict_layers):
            s.update(layer_tensors(args, j))
    return s


def expert_parts(name: str) -> Optional[Tuple[str, int, str]]:
    """'layers.3.ffn.experts.17.w2.weight' -> ('layers.3.ffn.experts', 17, 'w2'); None for other names."""
    m = _EXPERT_RE.match(name)
    return (m["prefix"], int(m["e"]), m["w"]) if m else None


def stacked_expert_name(prefix: str, w: str) -> str:
    """The MLX-layout tensor holding every routed expert's `w` projection, [E, out, in]."""
    return f"{prefix}.{w}.weight"


def official_to_mlx(name: str, shape: Shape, args: ModelArgs) -> Tuple[str, Shape, Optional[int]]:
    """(MLX name, MLX shape of the whole tensor, expert index or None) for one official tensor;
    a tensor already in the MLX layout maps to itself."""
    parts = expert_parts(name)
    if parts:
        prefix, e, w = parts
        return stacked_expert_name(prefix, w), (args.n_routed_experts, *shape), e
    if name.endswith(".attn.wo_a.weight") and len(shape) == 2:
        n, k = shape
        return name, (args.o_groups, n // args.o_groups, k), None
    return name, tuple(shape), None


def mlx_tensors(args: ModelArgs, *, mtp: bool = False) -> Dict[str, Shape]:
    """MLX-layout name -> unquantised shape: what `Model(args)` holds (plus MTP layers when asked)."""
    out: Dict[str, Shape] = {}
    for name, shape in official_tensors(args, mtp=mtp).items():
        mlx_name, mlx_shape, _ = official_to_mlx(name, shape, args)
        out[mlx_name] = mlx_shape
    return out


def is_mtp(name: str) -> bool:
    return name.startswith("mtp.")


def module_family(module: str) -> Optional[str]:
    """Quantisation family of a linear module path (no `.weight`), None for tensors that are not one."""
    for rx, fam in _FAMILY_RULES:
        if rx.match(module):
            return fam
    return None


def keeps_float32(name: str) -> bool:
    """mHC, sinks, ape, norms and the router bias stay float32 in the release and in every recipe."""
    return bool(_KEEP_F32_RE.search(name))


def release_storage(name: str, args: ModelArgs) -> str:
    """Stored precision of an official tensor in the Hub release: 'fp8', 'fp4', or a safetensors dtype."""
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    fam = module_family(module) if module else None
    if expert_parts(name) or fam == EXPERT:
        return "fp4" if args.expert_dtype == "fp4" else "fp8"
    if fam == DENSE:
        return "fp8"
    if name.endswith("tid2eid"):
        return "I32"
    if keeps_float32(name):
        return "F32"
    return "BF16"
