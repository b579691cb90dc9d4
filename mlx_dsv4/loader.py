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

from .config import ConfigError, ModelArgs, read_config
from .device_memory import DEFAULT_CONTEXT, check_fit
from .dspark import DSpark, check_dspark_shapes
from .layers import expert_weights
from .model import Model
from .mtp import MTP
from .paths import log_paths
from .streams import parallel_streams
from .spec import is_mtp, official_to_mlx


MTP_INDEX = "mtp.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or tensors, or holds unexpected ones."""


def _weight_files(path: Path, index_name: str = "model.safetensors.index.json"):
    index = path / index_name
    if index.exists():
        try:
            data = json.loads(index.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()
        ):
            raise CheckpointError(f"{index}: `weight_map` must be an object mapping tensor names to shard "
                                  "file names in the same directory")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
        return [path / f for f in files]
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("mtp"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


def _mtp_files(path: Path):
    """The converter's separate MTP shards (listed in mtp.safetensors.index.json, or mtp*.safetensors)."""
    if (path / MTP_INDEX).exists():
        return _weight_files(path, MTP_INDEX)
    if (path / "model.safetensors.index.json").exists():
        return []
    return sorted(path.glob("mtp*.safetensors"))


def _read_files(files) -> dict:
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with little context
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return weights


def read_weights(path: Path) -> dict:
    return {k: v for k, v in _read_files(_weight_files(path)).items() if not is_mtp(k)}


def _check_tensors(path: Path, expected: dict, weights: dict, what: str = "") -> None:
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing {what}tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"unexpected {what}tensors ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        raise CheckpointError(f"{path}: " + "; ".join(lines))
    bad_shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items() if weights[k].shape != v.shape
    ]
    if bad_shapes:
        raise CheckpointError(f"{path}: tensor shapes inconsistent with config.json: " + "; ".join(bad_shapes[:10]))


class _MTPLayers(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.mtp = [MTP(args, j) for j in range(args.num_nextn_predict_layers)]


def _load_mtp(path: Path, model: Model, config: dict) -> None:
    """Attach the checkpoint's MTP layers to `model` (model.mtp_layers); nothing when it has none."""
    main_files = _weight_files(path)
    files = main_files + [f for f in _mtp_files(path) if f not in main_files]
    # mx.load reads tensors lazily: only the mtp.* ones kept here are read from disk
    weights = {k: v for k, v in _read_files(files).items() if is_mtp(k)}
    if not weights:
        return
    if model.args.has_dspark:
        _load_dspark(path, model, config, weights)
        return
    holder = _MTPLayers(model.args)
    if config.get("quantization"):
        _apply_quantization(holder, config["quantization"])
    weights = to_mlx_layout(weights, model.args)
    _check_tensors(path, dict(tree_flatten(holder.parameters())), weights, "MTP ")
    holder.load_weights(list(weights.items()), strict=True)
    mx.eval(holder.parameters())
    holder.eval()
    object.__setattr__(model, "mtp_layers", tuple(holder.mtp))


_MARKOV = re.compile(r"^mtp\.(\d+)\.markov_head\.")


def _load_dspark(path: Path, model: Model, config: dict, weights: dict) -> None:
    """Attach the checkpoint's DSpark drafter as ``model.dspark``. Its confidence head (and the
    router's `bias_vl`), which the drafting rounds do not use, are not loaded; the Markov head
    may sit under any one stage."""
    args = model.args
    last = args.num_nextn_predict_layers - 1
    kept = {}
    for k, v in weights.items():
        if ".confidence_head." in k or k.endswith(".ffn.gate.bias_vl"):
            continue
        m = _MARKOV.match(k)
        if m and int(m.group(1)) != last:
            k = f"mtp.{last}." + k[m.end(1) + 1:]
            if k in weights:
                raise CheckpointError(f"{path}: the DSpark Markov head is stored twice ({k} and under mtp.{m.group(1)})")
        kept[k] = v
    try:
        check_dspark_shapes(args, kept, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    holder = DSpark(args)
    if config.get("quantization"):
        _apply_quantization(holder, config["quantization"])
    kept = to_mlx_layout(kept, args)
    _check_tensors(path, dict(tree_flatten(holder.parameters())), kept, "DSpark ")
    holder.load_weights(list(kept.items()), strict=True)
    mx.eval(holder.parameters())
    holder.eval()
    object.__setattr__(model, "dspark", holder)


def to_mlx_layout(weights: dict, args: ModelArgs) -> dict:
    """Official-layout tensors in the Model's layout (`spec.official_to_mlx`): experts stacked,
    `wo_a` split by group; tensors already in the MLX layout pass through."""
    scales = [k for k in weights if k.endswith(".scale") or k.endswith("weight_scale_inv")]
    if scales:
        raise CheckpointError(
            f"tensor {scales[0]} is a block scale: this is a quantised release checkpoint "
            "(FP8/FP4); convert it first with `mlx-dsv4 convert --recipe native`"
        )
    out, experts = {}, {}
    for k, v in weights.items():
        name, shape, e = official_to_mlx(k, tuple(v.shape), args)
        if e is not None:
            experts.setdefault(name, {})[e] = v
        elif v.ndim < len(shape):  # an official 2-D tensor the MLX layout splits (wo_a)
            out[name] = v.reshape(shape)
        else:
            out[name] = v
    for name, per_expert in experts.items():
        missing = sorted(set(range(args.n_routed_experts)) - set(per_expert))
        if missing:
            prefix, w = name[: -len(".weight")].rsplit(".", 1)
            raise CheckpointError(f"missing tensors: {prefix}.{{{','.join(map(str, missing))}}}.{w}.weight")
        out[name] = mx.stack([per_expert[e] for e in range(args.n_routed_experts)])
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


def read_checkpoint_config(path):
    """(path, config dict, ModelArgs) of a checkpoint directory, or an error naming it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = read_config(path)
    try:
        args = ModelArgs.from_dict(config)
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None
    return path, config, args


def load_model(path, *, context: int = DEFAULT_CONTEXT, check_memory: bool = True, mtp: bool = False) -> Model:
    """The model of a checkpoint directory. With ``check_memory``, before any weight is read:
    ``MemoryFitError`` when the weights exceed the machine's memory, ``MemoryFitWarning`` when
    weights + FP8 cache for ``context`` tokens exceed what it keeps resident. With ``mtp``, the
    checkpoint's MTP layers, when it has them, load as ``model.mtp_layers`` (the drafter for
    speculative decoding; off by default, as they cost memory that plain decoding does not use), or
    its DSpark drafter as ``model.dspark`` when config.json declares one (``dspark_block_size``)."""
    path, config, args = read_checkpoint_config(path)
    if check_memory:
        files = _weight_files(path) + (_mtp_files(path) if mtp else [])
        check_fit(config, sum(f.stat().st_size for f in set(files)), str(path), context)
    model = Model(args)
    if config.get("quantization"):
        _apply_quantization(model, config["quantization"])
    weights = to_mlx_layout(read_weights(path), args)
    _check_tensors(path, dict(tree_flatten(model.parameters())), weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    if mtp:
        _load_mtp(path, model, config)
    log_paths(len(parallel_streams()), expert_weights(model))
    return model


def load(path, **options):
    """(model, tokenizer); ``options`` go to ``load_model``."""
    from .tokenizer import load_tokenizer

    return load_model(path, **options), load_tokenizer(path)
