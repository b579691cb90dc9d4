"""Tiny checkpoints in the Hub release's stored layout, built from known float weights.

Encoding and decoding here are written independently of mlx_dsv4.convert (plain numpy,
bit arithmetic spelled out) so tests can check the converter against them.  Files are
written with the `safetensors` library through torch's float8 dtypes, as the release is.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

FP8_RULES = re.compile(r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|indexer\.wq_b\.weight$|"
                       r"shared_experts\.w[123]\.weight$|^mtp\.\d+\.(e_proj|h_proj)\.weight$")
FP4_RULES = re.compile(r"\.experts\.\d+\.w[123]\.weight$")
F32_RULES = re.compile(r"hc_|attn_sink|\.ape$|norm\.weight$|gate\.bias$")
RELEASE_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                 "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}


# --- reference codecs -------------------------------------------------------------------

def e4m3_value(code: int) -> float:
    s = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 7
    if e == 0xF and m == 7:
        return float("nan")
    if e == 0:
        return s * m * 2.0 ** -9
    return s * (8 + m) * 2.0 ** (e - 10)


E4M3 = np.array([e4m3_value(c) for c in range(256)], dtype=np.float64)
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float64)


def _nearest_code(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    pos = np.array([c for c in range(len(table)) if not np.isnan(table[c]) and table[c] >= 0
                    and not (table[c] == 0 and c != 0)])
    vals = table[pos]
    order = np.argsort(vals)
    vals, pos = vals[order], pos[order]
    a = np.abs(x)
    i = np.clip(np.searchsorted(vals, a), 1, len(vals) - 1)
    pick = np.where(a - vals[i - 1] <= vals[i] - a, i - 1, i)
    sign_bit = 0x80 if len(table) == 256 else 0x8
    return (pos[pick] | np.where((x < 0) & (pos[pick] != 0), sign_bit, 0)).astype(np.uint8)


def _pow2_scale_byte(amax: np.ndarray, top: float) -> np.ndarray:
    e = np.ceil(np.log2(np.maximum(amax, 1e-30) / top))
    return np.clip(e + 127, 1, 254).astype(np.uint8)


def encode_fp8(w: np.ndarray):
    n, k = w.shape
    gn, gk = math.ceil(n / 128), math.ceil(k / 128)
    scales = np.zeros((gn, gk), np.uint8)
    codes = np.zeros((n, k), np.uint8)
    for i in range(gn):
        for j in range(gk):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            b = _pow2_scale_byte(np.abs(blk).max(), 448.0)
            scales[i, j] = b
            codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = _nearest_code(blk / 2.0 ** (int(b) - 127), E4M3)
    return codes, scales


def decode_fp8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    n, k = codes.shape
    out = np.empty((n, k), np.float64)
    for i in range(n):
        for j0 in range(0, k, 128):
            out[i, j0:j0 + 128] = E4M3[codes[i, j0:j0 + 128]] * 2.0 ** (int(scales[i // 128, j0 // 128]) - 127)
    return out.astype(np.float32)


def encode_fp4(w: np.ndarray):
    n, k = w.shape
    g = math.ceil(k / 32)
    pad = np.zeros((n, g * 32), np.float64)
    pad[:, :k] = w
    amax = np.abs(pad.reshape(n, g, 32)).max(-1)
    scales = _pow2_scale_byte(amax, 6.0)
    scaled = pad.reshape(n, g, 32) / (2.0 ** (scales.astype(np.int64) - 127))[..., None]
    codes = _nearest_code(scaled.reshape(n, g * 32)[:, :k], E2M1)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed.view(np.int8), scales


def decode_fp4(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    p = packed.view(np.uint8)
    n, half = p.shape
    out = np.empty((n, 2 * half), np.float64)
    for j in range(half):
        lo, hi = p[:, j] & 0xF, p[:, j] >> 4
        s = 2.0 ** (scales[:, (2 * j) // 32].astype(np.int64) - 127)
        out[:, 2 * j] = E2M1[lo] * s
        out[:, 2 * j + 1] = E2M1[hi] * s
    return out.astype(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


# --- writers ----------------------------------------------------------------------------

def _torch(arr: np.ndarray, kind: str):
    import torch

    if kind == "F8_E4M3":
        return torch.from_numpy(arr.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    if kind == "F8_E8M0":
        return torch.from_numpy(arr.view(np.uint8).copy()).view(torch.float8_e8m0fnu)
    if kind == "BF16":
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def release_tensors(weights: dict, scale_suffix=".scale", scale_dtype="F8_E8M0"):
    """Float weights -> (stored {name: (array, dtype)}, decoded {name: float32 known values})."""
    stored, decoded = {}, {}
    for name, w in weights.items():
        base = name[: -len(".weight")]
        sname = base + ".scale" if scale_suffix == ".scale" else name + "_scale_inv"
        if FP4_RULES.search(name):
            packed, scales = encode_fp4(w)
            stored[name] = (packed, "I8")
            stored[sname] = (scales, scale_dtype)
            decoded[name] = decode_fp4(packed, scales)
        elif FP8_RULES.search(name):
            codes, scales = encode_fp8(w)
            stored[name] = (codes, "F8_E4M3")
            stored[sname] = (scales, scale_dtype)
            decoded[name] = decode_fp8(codes, scales)
        elif w.dtype.kind in "iu":
            stored[name] = (w, "I32")
            decoded[name] = w
        elif F32_RULES.search(name):
            stored[name] = (w.astype(np.float32), "F32")
            decoded[name] = w.astype(np.float32)
        else:
            stored[name] = (w, "BF16")
            decoded[name] = bf16_round(w)
    return stored, decoded


def write_shards(out: Path, stored: dict, n_shards: int, split_scales: bool = True):
    """Write `stored` into n_shards files with an index; scales go to the shard after their weight."""
    from safetensors.torch import save_file

    names = [n for n in stored if not (n.endswith(".scale") or n.endswith("_scale_inv"))]
    per = math.ceil(len(names) / n_shards)
    fname = lambda i: f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
    where = {}
    for idx, n in enumerate(names):
        where[n] = idx // per
    for n in stored:
        if n not in where:
            owner = n[: -len(".scale")] + ".weight" if n.endswith(".scale") else n[: -len("_scale_inv")]
            home = where.get(owner, 0)
            where[n] = (home + 1) % n_shards if split_scales else home
    for i in range(n_shards):
        tensors = {n: _torch(*stored[n]) for n in stored if where[n] == i}
        save_file(tensors, str(out / fname(i)), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {n: fname(where[n]) for n in sorted(stored)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def tiny_cfg(**overrides):
    from mlx_dsv4.tiny import tiny_config

    overrides.setdefault("vocab_size", 256)
    return tiny_config(overrides.pop("preset", "flash"), **overrides)


def write_release_checkpoint(out, *, seed=0, n_shards=3, scale_suffix=".scale", scale_dtype="F8_E8M0",
                             mtp=True, weights=None, cfg=None, **overrides):
    """Returns (dir, decoded float32 weights keyed by official name, config)."""
    from mlx_dsv4.tiny import tiny_weights

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or tiny_cfg(**overrides)
    weights = weights if weights is not None else tiny_weights(cfg, seed=seed, mtp=mtp)
    stored, decoded = release_tensors(weights, scale_suffix, scale_dtype)
    write_shards(out, stored, n_shards)
    rcfg = dict(cfg, quantization_config=RELEASE_QUANT, expert_dtype="fp4", torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(rcfg, indent=2))
    (out / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (out / "tokenizer_config.json").write_text('{"bos_token": "<bos>"}')
    (out / "encoding").mkdir(exist_ok=True)
    (out / "encoding" / "encoding_dsv4.py").write_text("# chat encoding helper\nVERSION = 4\n")
    return out, decoded, cfg


def write_float_checkpoint(out, decoded: dict, cfg: dict):
    """The dequantised weights in the official float32 layout (what the reference model reads)."""
    import mlx.core as mx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"),
                        {k: mx.array(v) for k, v in decoded.items() if not k.startswith("mtp.")},
                        metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(cfg, torch_dtype="float32"), indent=2))
    return out


def read_dir(path) -> dict:
    """Every tensor of every *.safetensors file in a directory, as mx arrays."""
    import mlx.core as mx

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def dequantized(path) -> dict:
    """A converted directory's tensors as float32 numpy, quantised modules dequantised by MLX."""
    import mlx.core as mx

    cfg = json.loads((Path(path) / "config.json").read_text())
    q = cfg.get("quantization") or {}
    raw = read_dir(path)
    out = {}
    for name, a in raw.items():
        if name.endswith((".scales", ".biases")):
            continue
        spec = q.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if isinstance(spec, dict):
            m = name[: -len(".weight")]
            a = mx.dequantize(a, raw[m + ".scales"], raw.get(m + ".biases"), group_size=spec["group_size"],
                              bits=spec["bits"], mode=spec["mode"], dtype=mx.float32)
        out[name] = np.array(a.astype(mx.float32) if a.dtype != mx.int32 else a)
    return out


def official_view(decoded: dict, cfg: dict) -> dict:
    """Known float weights renamed/stacked/reshaped into the MLX layout (independent of the converter)."""
    out, experts = {}, {}
    for name, v in decoded.items():
        m = re.match(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$", name)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = v
        elif name.endswith("attn.wo_a.weight"):
            out[name] = v.reshape(cfg["o_groups"], -1, v.shape[1])
        else:
            out[name] = v
    for (prefix, w), by_e in experts.items():
        out[f"{prefix}.{w}.weight"] = np.stack([by_e[e] for e in sorted(by_e)])
    return out


def same_tensors(a: dict, b: dict) -> bool:
    import mlx.core as mx

    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                    and bool(mx.array_equal(a[k], b[k])) for k in a)
