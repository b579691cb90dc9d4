"""Re-read a converted directory and check every tensor against its config.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, read_config
from .errors import ConvertError
from .plan import model_args, plan_units, sources_from_config
from .reader import FLOAT_DTYPES, INT_DTYPES, read_header
from .recipes import Quant
from .writer import CHECKSUM, INDEX, file_checksum


def _read_index(path: Path, problems: list) -> dict:
    try:
        wm = json.loads(path.read_text())["weight_map"]
        if isinstance(wm, dict):
            return wm
        problems.append(f"{path}: weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{path}: unreadable index: {e}")
    return {}


def _check_checksums(index: Path, shards, problems: list):
    """Shards whose bytes differ from the SHA-256 recorded in the index when they were written."""
    try:
        recorded = json.loads(index.read_text()).get("metadata", {}).get(CHECKSUM)
    except (OSError, ValueError, AttributeError):
        return  # an unreadable index is reported with its weight_map
    if not isinstance(recorded, dict):
        return  # written before shards had checksums
    for fname in shards:
        path = index.parent / fname
        if fname not in recorded:
            problems.append(f"{path}: no checksum recorded in {index.name}")
            continue
        try:
            actual = file_checksum(path)
        except OSError as e:
            problems.append(f"{path}: cannot read: {e.strerror or e}")
            continue
        if actual != recorded[fname]:
            problems.append(f"{path}: contents changed since it was written: SHA-256 {actual}, {index.name} "
                            f"records {recorded[fname]}")


def verify_dir(out: Path, checksums: bool = True) -> tuple[list[str], dict]:
    """Returns (problems, stats); an empty problem list means the directory is complete.
    checksums=False skips re-reading the shards to compare them with their recorded SHA-256."""
    out = Path(out)
    problems: list[str] = []
    try:
        cfg = read_config(out / "config.json")
    except ConfigError as e:
        return [str(e)], {}
    if cfg.get("mlx_dsv4_format") != 1:
        problems.append(f"{out / 'config.json'}: mlx_dsv4_format is {cfg.get('mlx_dsv4_format')!r}, expected 1")
    try:
        args = model_args(cfg, str(out / "config.json"))
    except ConvertError as e:
        return problems + [str(e)], {}
    qmap = cfg.get("quantization") or {}
    if not isinstance(qmap, dict):
        return problems + [f"{out / 'config.json'}: `quantization` must be an object, got {qmap!r}"], {}

    def decide(module, family, kind, k):
        q = qmap.get(module)
        if not isinstance(q, dict):
            return None
        try:
            return Quant(str(q["mode"]), int(q["bits"]), int(q["group_size"]))
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{out / 'config.json'}: `quantization.{module}` = {q!r}: needs mode, bits "
                               "and group_size") from None

    has_mtp = (out / INDEX["mtp"]).exists()
    try:
        units = plan_units(sources_from_config(args, has_mtp), args, decide, "BF16", has_mtp)
    except ConvertError as e:
        return problems + [str(e)], {}
    expected = {name: (dt, shape, u.group) for u in units for name, dt, shape in u.outputs}
    stats = {"tensors": 0, "bytes": 0, "files": 0}
    for group in ("model", "mtp"):
        index = out / INDEX[group]
        if not index.exists():
            if group == "model":
                problems.append(f"{index}: missing")
            continue
        wm = _read_index(index, problems)
        headers = {}
        for fname in sorted(set(wm.values())):
            path = out / fname
            if not path.exists():
                problems.append(f"{path}: missing shard listed in {index.name}")
                continue
            try:
                headers[fname] = read_header(path)
            except ConvertError as e:
                problems.append(str(e))
                continue
            stats["files"] += 1
            for name in headers[fname]:
                if wm.get(name) != fname:
                    problems.append(f"{path}: tensor {name!r} is not in {index.name}")
        if checksums:
            _check_checksums(index, sorted(headers), problems)
        for name, fname in sorted(wm.items()):
            entry = headers.get(fname, {}).get(name)
            if fname in headers and entry is None:
                problems.append(f"{out / fname}: tensor {name!r} listed in {index.name} is missing")
            if entry is None:
                continue
            stats["tensors"] += 1
            stats["bytes"] += entry.nbytes
            want = expected.get(name)
            if want is None:
                if group != "mtp":
                    problems.append(f"{entry.file}: tensor {name!r} is not expected by config.json")
                continue
            dt, shape, _ = want
            if tuple(entry.shape) != tuple(shape):
                problems.append(f"{entry.file}: tensor {name!r}: shape {list(entry.shape)}, expected {list(shape)}")
            ok = (entry.dtype == dt if dt in ("F32", "U32", "U8") else
                  entry.dtype in FLOAT_DTYPES if dt in ("BF16", "F16") else
                  entry.dtype in INT_DTYPES)
            if not ok:
                problems.append(f"{entry.file}: tensor {name!r}: dtype {entry.dtype}, expected {dt}"
                                + (" (any float)" if dt in ("BF16", "F16") else ""))
        if group == "model":
            for name, (_, _, g) in expected.items():
                if g == "model" and name not in wm:
                    problems.append(f"{index}: tensor {name!r} required by config.json is missing")
    return problems, stats
