"""The conversion pipeline: resolve, validate, plan, estimate, stream shards, verify, rename."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from ..config import ConfigError, read_config
from ..mlx_lm_files import mlx_lm_config, write_mlx_lm_files
from ..sizes import format_decimal_bytes
from . import hub, transform
from .errors import ConvertError
from .estimate import GB, estimate_units
from .plan import check_against_config, model_args, plan_units, quantization_config, sources_from_checkpoint
from .reader import Checkpoint
from .recipes import Recipe
from .verify import verify_dir
from .writer import CHECKSUM, INDEX, OutputDir, fingerprint, layout_shards, refuse_overlap

COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_config(src: Path) -> dict:
    try:
        return read_config(src / "config.json")
    except ConfigError as e:
        raise ConvertError(str(e)) from None


def prepare(src: Path, recipe: Recipe, include_mtp: bool = True):
    """Validate the source against its config and plan the output; nothing is written."""
    cfg = load_config(src)
    args = model_args(cfg, str(src / "config.json"))
    ckpt = Checkpoint(src)
    srcs = sources_from_checkpoint(ckpt)
    warnings = check_against_config(srcs, args, str(src))
    units = plan_units(srcs, args, lambda m, fam, kind, k: recipe.decide(fam, kind, k), recipe.float_dtype,
                       include_mtp)
    units.sort(key=lambda u: (u.group, _natural(u.name)))
    return cfg, args, ckpt, units, warnings


def output_config(cfg: dict, units) -> dict:
    out = {k: v for k, v in cfg.items() if k not in ("quantization_config", "quantization")}
    out["mlx_dsv4_format"] = 1
    q = quantization_config(units)
    if q:
        out["quantization"] = q
    return out


def convert(hf_path, mlx_path, recipe: Recipe, *, revision=None, include_mtp=True, shard_gb=5.0,
            max_size_gb=None, context=32768, resume=False, overwrite=False, progress=True,
            log=lambda s: print(s, file=sys.stderr)) -> dict:
    t0 = time.time()
    src = hub.resolve(str(hf_path), revision)
    cfg, args, ckpt, units, warnings = prepare(src, recipe, include_mtp)
    refuse_overlap(src, [src / "config.json", *ckpt.files], Path(mlx_path))
    for w in warnings:
        log(f"warning: {w}")
    est = estimate_units(units, args, recipe, context)
    for line in est.lines():
        log(line)
    total = sum(u.nbytes for u in units)
    if max_size_gb is not None and total > max_size_gb * GB:
        raise ConvertError(f"output would be {total / GB:.2f} GB, over --max-size {max_size_gb:g} GB; "
                           "pick a smaller recipe (e.g. --recipe q2) or raise --max-size")
    shards = layout_shards(units, int(shard_gb * GB))
    source_id = [(str(p.name), p.stat().st_size, int(p.stat().st_mtime)) for p in ckpt.files]
    fp = fingerprint(shards, {"recipe": recipe.__dict__, "source": source_id})
    out = OutputDir(Path(mlx_path), fp, resume, overwrite, total, log)
    if out.finished:
        problems, _ = verify_dir(out.out)
        if problems:
            raise ConvertError(f"{out.out}: an earlier run moved this output into place and stopped before "
                               "finishing, but it fails verification; convert again with --overwrite and "
                               "without --resume:\n  " + "\n  ".join(problems[:20]))
        log(f"{out.out}: complete; finishing the earlier run that stopped while moving it into place")
    else:
        if out.done:
            log(f"resuming: {len(out.done)} of {len(shards)} shards already written")
        _write_output(out, src, cfg, units, shards, ckpt, progress)
    out.finish()
    n_tensors = sum(len(u.outputs) for u in units)
    summary = {"tensors": n_tensors, "bytes_in": sum(u.in_bytes for u in units), "bytes_out": total,
               "shards": len(shards), "seconds": time.time() - t0, "recipe": recipe.describe(),
               "out": str(mlx_path)}
    log(f"done: {summary['tensors']} tensors, {format_decimal_bytes(summary['bytes_in'])} in -> "
        f"{format_decimal_bytes(summary['bytes_out'])} out in {summary['shards']} shards, "
        f"{summary['seconds']:.1f} s, recipe {summary['recipe']} -> {mlx_path}")
    return summary


def _write_output(out: OutputDir, src: Path, cfg: dict, units, shards, ckpt: Checkpoint, progress: bool):
    from tqdm.auto import tqdm

    total = sum(u.nbytes for u in units)
    n_tensors = sum(len(u.outputs) for u in units)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress or None,
               file=sys.stderr)
    done_tensors = 0

    def on_unit(u):
        nonlocal done_tensors
        done_tensors += len(u.outputs)
        bar.update(u.nbytes)
        bar.set_postfix_str(f"{done_tensors}/{n_tensors} tensors", refresh=False)

    for shard in shards:
        if out.is_done(shard):
            for u in shard.units:
                on_unit(u)
            continue
        out.write_shard(shard, lambda u: transform.compute(ckpt, u), on_unit)
    bar.close()

    for group in ("model", "mtp"):
        files = [s for s in shards if s.group == group]
        if files:
            out.write_json(INDEX[group], {
                "metadata": {"total_size": sum(s.nbytes for s in files), "format": "mlx",
                             CHECKSUM: {s.filename: out.checksum(s) for s in files}},
                "weight_map": dict(sorted((name, s.filename) for s in files for u in s.units
                                          for name, _, _ in u.outputs))})
    for name in COPY_FILES:
        if (src / name).is_file():
            out.copy_file(src / name, name)
    for f in sorted((src / "encoding").rglob("*")) if (src / "encoding").is_dir() else []:
        if f.is_file():
            out.copy_file(f, str(f.relative_to(src)))
    # mlx-lm opens the output through these (model file, chat template); the source's template is replaced
    write_mlx_lm_files(out.tmp, write=out.write_text, tokenizer=False)
    out.write_json("config.json", mlx_lm_config(output_config(cfg, units)))
    # the shards were hashed while written: re-reading them here would only double the I/O
    problems, _ = verify_dir(out.tmp, checksums=False)
    if problems:
        raise ConvertError("output failed verification (kept in " + str(out.tmp) + "):\n  " + "\n  ".join(problems[:20]))
