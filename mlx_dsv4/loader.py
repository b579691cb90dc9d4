"""Load a DeepSeek-V4 checkpoint directory into the MLX model.

Accepts the official Hub layout with float weights (per-expert tensors) and
the MLX layout written by `mlx-dsv4 convert` (stacked experts, optional
per-module quantisation in config.json["quantization"]).
"""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .model import Model

_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or tensors, or holds unexpected ones."""


def _weight_files(path: Path):
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
        return [path / f for f in files]
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("mtp"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


def read_weights(path: Path) -> dict:
    weights = {}
    for f in _weight_files(path):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with little context
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return {k: v for k, v in weights.items() if not k.startswith("mtp.")}


def to_mlx_layout(weights: dict, args: ModelArgs) -> dict:
    """Stack per-expert tensors and shape wo_a for the grouped matmul."""
    scales = [k for k in weights if k.endswith(".scale") or k.endswith("weight_scale_inv")]
    if scales:
        raise CheckpointError(
            f"tensor {scales[0]} is a block scale: this is a quantised release checkpoint "
            "(FP8/FP4); convert it first with `mlx-dsv4 convert --recipe native`"
        )
    out, experts = {}, {}
    for k, v in weights.items():
        m = _EXPERT.match(k)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = v
        else:
            out[k] = v
    for (prefix, name), per_expert in experts.items():
        missing = sorted(set(range(args.n_routed_experts)) - set(per_expert))
        if missing:
            raise CheckpointError(f"missing tensors: {prefix}.{{{','.join(map(str, missing))}}}.{name}.weight")
        out[f"{prefix}.{name}.weight"] = mx.stack([per_expert[e] for e in range(args.n_routed_experts)])
    G = args.o_groups
    for k in [k for k in out if k.endswith("attn.wo_a.weight") and out[k].ndim == 2]:
        w = out[k]
        out[k] = w.reshape(G, w.shape[0] // G, w.shape[1])
    for k in [k for k in out if k.endswith("gate.tid2eid")]:
        out[k] = out[k].astype(mx.int32)
    return out


def _apply_quantization(model: Model, quantization: dict) -> None:
    def predicate(path, module):
        spec = quantization.get(path, False)
        return spec if isinstance(spec, dict) else False

    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_model(path) -> Model:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    args = ModelArgs.from_path(path)
    config = json.loads((path / "config.json").read_text())
    model = Model(args)
    if config.get("quantization"):
        _apply_quantization(model, config["quantization"])
    weights = to_mlx_layout(read_weights(path), args)

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        raise CheckpointError(f"{path}: " + "; ".join(lines))
    bad_shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items() if weights[k].shape != v.shape
    ]
    if bad_shapes:
        raise CheckpointError(f"{path}: tensor shapes inconsistent with config.json: " + "; ".join(bad_shapes[:10]))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def load(path):
    from .tokenizer import load_tokenizer

    return load_model(path), load_tokenizer(path)
