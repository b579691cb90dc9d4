"""From source tensors to output work units: names, shapes, dtypes and sizes, before any data is read.

A unit is one output tensor (float/int) or one output module (weight + scales [+ biases]);
routed experts of a layer form a single stacked unit.  Planning first makes the size
estimate exact, lets shards be laid out ahead (so each is written in one streaming pass),
and catches inconsistent input before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import spec
from ..config import ConfigError, ModelArgs
from .errors import ConvertError
from .reader import FLOAT_DTYPES, INT_DTYPES, Checkpoint
from .recipes import Quant

ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4, "U8": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
SCALE_SUFFIXES = (".weight_scale_inv", ".scale")


@dataclass
class Source:
    name: str  # official tensor name
    kind: str  # 'fp8' | 'fp4' | 'float' | 'int'
    shape: tuple  # logical (dequantised) shape
    dtype: str  # storage dtype of the tensor (of the weight, for fp8/fp4)
    nbytes: int  # stored bytes, scale included
    scale: str | None = None
    scale_dtype: str | None = None
    file: str = ""


@dataclass
class Unit:
    name: str  # output tensor name, or module path for a linear/embedding module
    sources: list
    group: str  # 'model' or 'mtp'
    quant: Quant | None
    outputs: list = field(default_factory=list)  # [(name, dtype, shape)]
    family: str | None = None
    reshape: tuple | None = None  # logical output shape when it differs from the source's

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * ITEMSIZE[d] for _, d, s in self.outputs)

    @property
    def in_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)


def _scale_owner(name: str):
    for suf in SCALE_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)] + ".weight"
    return None


def sources_from_checkpoint(ckpt: Checkpoint) -> dict[str, Source]:
    entries = ckpt.entries
    scales = {}
    for name, e in entries.items():
        owner = _scale_owner(name)
        if owner is None:
            continue
        if owner not in entries:
            raise ConvertError(f"{e.file}: tensor {name!r}: scale without its weight {owner!r}")
        if owner in scales:
            raise ConvertError(f"{e.file}: tensor {owner!r} has two scales: {scales[owner]!r} and {name!r}")
        if e.dtype not in ("F8_E8M0", "U8", "F32", "BF16", "F16"):
            raise ConvertError(f"{e.file}: tensor {name!r}: unsupported scale dtype {e.dtype}")
        scales[owner] = name
    out = {}
    for name, e in entries.items():
        if name in scales.values():
            continue
        sname = scales.get(name)
        se = entries[sname] if sname else None
        if se is None:
            if e.dtype == "F8_E4M3":
                raise ConvertError(f"{e.file}: tensor {name!r}: FP8 weight without its scale "
                                   f"({name[:-len('.weight')]}.scale or {name}_scale_inv)")
            if e.dtype in ("I8", "U8") and name.endswith(".weight"):
                raise ConvertError(f"{e.file}: tensor {name!r}: packed FP4 weight without its scale "
                                   f"({name[:-len('.weight')]}.scale)")
            if e.dtype in FLOAT_DTYPES:
                out[name] = Source(name, "float", e.shape, e.dtype, e.nbytes, file=str(e.file))
            elif e.dtype in INT_DTYPES:
                out[name] = Source(name, "int", e.shape, e.dtype, e.nbytes, file=str(e.file))
            else:
                raise ConvertError(f"{e.file}: tensor {name!r}: unsupported dtype {e.dtype}")
            continue
        if len(e.shape) != 2 or len(se.shape) != 2:
            raise ConvertError(f"{e.file}: tensor {name!r}: quantised weight and scale must be 2-D "
                               f"(got {list(e.shape)} and {list(se.shape)})")
        n, k = e.shape
        block = (math.ceil(n / 128), math.ceil(k / 128))
        if e.dtype in ("I8", "U8") and tuple(se.shape) == (n, math.ceil(2 * k / 32)):
            kind, shape = "fp4", (n, 2 * k)
        elif e.dtype in ("F8_E4M3", "U8") and tuple(se.shape) == block:
            kind, shape = "fp8", (n, k)
        elif e.dtype in ("F8_E4M3", "I8", "U8"):
            want = f"{list(block)} (FP8 128x128 blocks)" if e.dtype == "F8_E4M3" else \
                f"[{n}, {math.ceil(2 * k / 32)}] (FP4 per-32 row scales)"
            raise ConvertError(f"{se.file}: tensor {sname!r}: scale shape {list(se.shape)} does not fit weight "
                               f"{name!r} of {e.dtype}{list(e.shape)}; expected {want}")
        else:
            raise ConvertError(f"{e.file}: tensor {name!r}: has scale {sname!r} but dtype {e.dtype} is neither "
                               "FP8 (F8_E4M3) nor packed FP4 (I8)")
        out[name] = Source(name, kind, shape, e.dtype, e.nbytes + se.nbytes, sname, se.dtype, str(e.file))
    return out


def model_args(cfg: dict, source: str = "config.json") -> ModelArgs:
    """The config's ModelArgs; its problems become ConvertError naming the file."""
    try:
        return ModelArgs.from_dict(cfg)
    except ConfigError as e:
        raise ConvertError(f"{source}: {e}") from None


def check_against_config(srcs: dict[str, Source], args: ModelArgs, where: str) -> list[str]:
    """Raise on shapes inconsistent with config.json or missing tensors; return warnings."""
    has_mtp = any(spec.is_mtp(n) for n in srcs)
    expected = spec.official_tensors(args, mtp=has_mtp)
    warnings = []
    for name, s in srcs.items():
        want = expected.get(name)
        if want is None:
            if spec.is_mtp(name):
                warnings.append(f"{s.file}: tensor {name!r}: unknown MTP tensor, copied as is")
                continue
            raise ConvertError(f"{s.file}: tensor {name!r}: not a DeepSeek-V4 tensor for this config.json")
        if tuple(s.shape) != tuple(want):
            raise ConvertError(f"{s.file}: tensor {name!r}: shape {list(s.shape)} is inconsistent with "
                               f"config.json (expected {list(want)})")
    # the MTP layer's exact contents vary between exports: check shapes, not completeness
    missing = [n for n in expected if n not in srcs and not spec.is_mtp(n)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{where}: missing tensor {missing[0]!r}{more} required by config.json")
    n_mtp = args.num_nextn_predict_layers
    if n_mtp and not has_mtp:
        warnings.append(f"{where}: config.json declares {n_mtp} MTP layer(s) but the checkpoint has no mtp.* tensors")
    return warnings


def sources_from_config(args: ModelArgs, include_mtp: bool = True) -> dict[str, Source]:
    """The Hub release's tensors as declared by a config alone (for size estimates)."""
    out = {}
    for name, shape in spec.official_tensors(args, mtp=include_mtp).items():
        st = spec.release_storage(name, args)
        if st == "fp8":
            n, k = shape
            nbytes = n * k + math.ceil(n / 128) * math.ceil(k / 128)
            out[name] = Source(name, "fp8", shape, "F8_E4M3", nbytes, name[:-7] + ".scale", "F8_E8M0")
        elif st == "fp4":
            n, k = shape
            out[name] = Source(name, "fp4", shape, "I8", n * k // 2 + n * math.ceil(k / 32),
                               name[:-7] + ".scale", "F8_E8M0")
        else:
            kind = "int" if st.startswith("I") else "float"
            out[name] = Source(name, kind, shape, st, math.prod(shape) * ITEMSIZE[st])
    return out


def _module_outputs(module: str, q: Quant | None, shape: tuple, float_dtype: str) -> list:
    if q is None:
        return [(module + ".weight", float_dtype, shape)]
    *lead, k = shape
    lead = tuple(lead)
    outs = [(module + ".weight", "U32", lead + (k * q.bits // 32,))]
    if q.mode == "affine":
        outs += [(module + ".scales", float_dtype, lead + (k // q.group_size,)),
                 (module + ".biases", float_dtype, lead + (k // q.group_size,))]
    else:
        outs.append((module + ".scales", "U8", lead + (k // q.group_size,)))
    return outs


def _int_dtype(name: str, dtype: str, args: ModelArgs) -> str:
    """Expert ids (a hash layer's table, vocabulary x top-k) fit one byte when there are at most 256
    experts: the loader widens them back to int32."""
    return "U8" if name.endswith("tid2eid") and args.n_routed_experts <= 256 else dtype


def plan_units(srcs: dict[str, Source], args: ModelArgs, decide, float_dtype: str,
               include_mtp: bool = True) -> list[Unit]:
    """`decide(module, family, kind, k)` -> Quant or None picks each module's quantisation."""
    units = []
    experts: dict[tuple, dict] = {}
    for name, s in srcs.items():
        group = "mtp" if spec.is_mtp(name) else "model"
        if group == "mtp" and not include_mtp:
            continue
        ep = spec.expert_parts(name)
        if ep:
            prefix, e, w = ep
            experts.setdefault((prefix, w), {})[e] = s
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        family = spec.module_family(module) if module else None
        if s.kind == "int":
            units.append(Unit(name, [s], group, None, [(name, _int_dtype(name, s.dtype, args), s.shape)]))
        elif family is None:
            if s.kind != "float":
                raise ConvertError(f"{s.file}: tensor {name!r}: quantised ({s.kind}) but not a linear "
                                   "module the MLX model can quantise")
            dt = "F32" if spec.keeps_float32(name) else float_dtype
            units.append(Unit(name, [s], group, None, [(name, dt, s.shape)]))
        else:
            q = decide(module, family, s.kind, s.shape[-1])
            _, shape, _ = spec.official_to_mlx(name, tuple(s.shape), args)
            reshape = shape if shape != tuple(s.shape) else None
            units.append(Unit(module, [s], group, q, _module_outputs(module, q, shape, float_dtype),
                              family, reshape))
    for (prefix, w), by_e in experts.items():
        module = spec.stacked_expert_name(prefix, w)[: -len(".weight")]
        group = "mtp" if spec.is_mtp(module) else "model"
        if sorted(by_e) != list(range(len(by_e))):
            gap = next(i for i in range(len(by_e) + 1) if i not in by_e)
            raise ConvertError(f"missing tensor '{prefix}.{gap}.{w}.weight' (experts of {prefix} are not 0..E-1)")
        ordered = [by_e[i] for i in range(len(by_e))]
        kinds = {s.kind for s in ordered}
        shapes = {tuple(s.shape) for s in ordered}
        if len(kinds) > 1 or len(shapes) > 1:
            raise ConvertError(f"{ordered[0].file}: experts of {module} mix precisions or shapes "
                               f"({sorted(kinds)}, {sorted(shapes)})")
        q = decide(module, spec.EXPERT, ordered[0].kind, ordered[0].shape[-1])
        shape = (len(ordered),) + tuple(ordered[0].shape)
        units.append(Unit(module, ordered, group, q, _module_outputs(module, q, shape, float_dtype),
                          spec.EXPERT, shape))
    return units


def quantization_config(units: list[Unit]) -> dict | None:
    """mlx-lm style per-module map: every quantisable module listed, False when left float."""
    mods = {}
    counts: dict[Quant, int] = {}
    for u in units:
        if u.family is None:
            continue
        mods[u.name] = u.quant.as_config() if u.quant else False
        if u.quant:
            counts[u.quant] = counts.get(u.quant, 0) + u.nbytes
    if not counts:
        return None
    main = max(counts, key=counts.get)
    return {**main.as_config(), **dict(sorted(mods.items()))}
