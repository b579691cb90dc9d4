"""The shipped form of a trained checkpoint: the converter's MLX format, the vocabulary-sized
embedding quantised (it is nearly all of the bytes), experts 8-bit, the rest bfloat16 (a quantised
embedding makes bfloat16 the activation dtype in any case). A run whose head is its embedding times
one scale (`train-tiny --tie-head`) ships with the two tied, so the embedding is stored once."""

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

SHIP_EMBED_BITS = 8


def tied_checkpoint(official_dir, out_dir) -> bool:
    """When the head of the float32 official-layout checkpoint in `official_dir` is its embedding
    times a scale s, write it to `out_dir` with tie_word_embeddings: no head.weight, and s moved
    into the weights of the norms before the head (the model's and each MTP layer's), since
    (RMSNorm(x) * w) . (s E) = (RMSNorm(x) * s w) . E. False, writing nothing, when the head is not
    such a copy."""
    src, out = Path(official_dir), Path(out_dir)
    config = json.loads((src / "config.json").read_text())
    weights = mx.load(str(src / "model.safetensors"))
    if config.get("tie_word_embeddings") or "head.weight" not in weights:
        return False
    embed, head = np.array(weights["embed.weight"], np.float64), np.array(weights["head.weight"], np.float64)
    scale = float((head * embed).sum() / (embed * embed).sum())
    if not np.allclose(head, embed * scale, rtol=1e-5, atol=1e-6 * np.abs(head).max()):
        return False
    del weights["head.weight"]
    for name in ["norm.weight"] + [f"mtp.{j}.norm.weight" for j in range(config.get("num_nextn_predict_layers", 0))]:
        weights[name] = weights[name] * scale
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}, indent=2) + "\n")
    return True


def training_stages(run_dir) -> list:
    """The `train-tiny` runs that made `run_dir`, first to last: each one's train_options.json
    (its init_from reduced to the directory's name) with `stopped_at_step`, where the next run
    took its weights (a run's last step unless a snapshot was taken earlier)."""
    from .trainer import saved_step

    stages, run = [], Path(run_dir)
    while run is not None:
        options = json.loads((run / "train_options.json").read_text())
        step = saved_step(run)
        step = options["steps"] if step is None else step
        parent = Path(options["init_from"]) if options.get("init_from") else None
        stages.append({"run": run.name, **options, "init_from": parent.name if parent else None,
                       "stopped_at_step": step})
        run = parent
    return stages[::-1]


def ship(official_dir, out_dir, embed_bits: int = SHIP_EMBED_BITS, log=lambda s: None) -> dict:
    """Convert the float32 official-layout checkpoint `train-tiny` wrote in `official_dir` to
    `out_dir` (replaced), tied when `tied_checkpoint` finds the head a scaled copy of the embedding,
    with the runs that made it in training.json (`training_stages`)."""
    from ..convert.convert import convert
    from ..convert.recipes import Recipe

    recipe = Recipe("q8", dense_bits=None, embed_bits=embed_bits, dtype="bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) if tied_checkpoint(official_dir, tmp) else Path(official_dir)
        report = convert(src, Path(out_dir), recipe, include_mtp=True, overwrite=True, progress=False, log=log)
    stages = training_stages(official_dir)
    (Path(out_dir) / "training.json").write_text(json.dumps(stages, indent=1) + "\n")
    return report
