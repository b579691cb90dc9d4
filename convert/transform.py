"""Compute the output arrays of one unit from the source bytes."""

from __future__ import annotations

import numpy as np

from . import formats
from .errors import ConvertError
from .plan import Unit
from .reader import Checkpoint, to_float32

NP_OUT = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "U8": np.uint8,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8}


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16, returned as uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def cast_float(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return float32_to_bf16_bits(x)
    return x.astype(NP_OUT[dtype])


def _scale_bytes(ckpt: Checkpoint, src) -> np.ndarray:
    raw = ckpt.read(src.scale)
    if src.scale_dtype in ("F8_E8M0", "U8"):
        return raw
    e8 = formats.float_scale_to_e8m0(to_float32(raw, src.scale_dtype))
    if e8 is None:
        raise ConvertError(f"{src.file}: tensor {src.scale!r}: scales are not powers of two, so the release "
                           "bits cannot be kept; use --recipe none or an affine recipe")
    return e8


def _scale_float(ckpt: Checkpoint, src) -> np.ndarray:
    raw = ckpt.read(src.scale)
    if src.scale_dtype in ("F8_E8M0", "U8"):
        return formats.e8m0_to_float(raw)
    return to_float32(raw, src.scale_dtype)


def dequantize(ckpt: Checkpoint, src) -> np.ndarray:
    """Any source tensor as float32 in its logical shape."""
    if src.kind == "fp8":
        return formats.dequant_fp8(ckpt.read(src.name), _scale_float(ckpt, src))
    if src.kind == "fp4":
        return formats.dequant_fp4(ckpt.read(src.name).view(np.uint8), _scale_float(ckpt, src))
    return ckpt.read_float(src.name)


def _affine(w: np.ndarray, q, float_dtype: str):
    import mlx.core as mx

    mx_dtype = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}[float_dtype]
    wq, scales, biases = mx.quantize(mx.array(w).astype(mx_dtype), group_size=q.group_size, bits=q.bits,
                                     mode="affine")
    out = [np.array(wq)]
    for a in (scales, biases):
        out.append(np.array(a.view(mx.uint16)) if float_dtype == "BF16" else np.array(a))
    return out


def _one(ckpt: Checkpoint, unit: Unit, src, float_dtype: str) -> list:
    q = unit.quant
    if src.kind == "int":
        a, out = ckpt.read(src.name), NP_OUT[unit.outputs[0][1]]
        if a.dtype != out and a.size and (a.min() < np.iinfo(out).min or a.max() > np.iinfo(out).max):
            raise ConvertError(f"{src.file}: tensor {src.name!r}: values {a.min()}..{a.max()} do not fit "
                               f"{unit.outputs[0][1]}")
        return [a.astype(out, copy=False)]
    if q is None:
        return [cast_float(dequantize(ckpt, src), float_dtype)]
    if q.mode == "mxfp8":
        if src.kind != "fp8":
            raise ConvertError(f"{src.file}: tensor {src.name!r}: mxfp8 output needs an FP8 source")
        return list(formats.fp8_to_mxfp8(ckpt.read(src.name), _scale_bytes(ckpt, src)))
    if q.mode == "mxfp4":
        if src.kind != "fp4":
            raise ConvertError(f"{src.file}: tensor {src.name!r}: mxfp4 output needs an FP4 source")
        return list(formats.fp4_to_mxfp4(ckpt.read(src.name), _scale_bytes(ckpt, src)))
    return _affine(dequantize(ckpt, src), q, float_dtype)


def compute(ckpt: Checkpoint, unit: Unit) -> list[np.ndarray]:
    """Arrays matching unit.outputs, in order (BF16 as uint16 bits)."""
    specs = unit.outputs
    if len(unit.sources) == 1:
        arrays = _one(ckpt, unit, unit.sources[0], _float_dtype(unit))
        arrays = [a.reshape(shape) for a, (_, _, shape) in zip(arrays, specs)]
    else:
        # stacked experts: fill preallocated stacks one expert at a time
        arrays = [np.empty(shape, dtype=NP_OUT[dt]) for _, dt, shape in specs]
        for e, src in enumerate(unit.sources):
            for dst, part in zip(arrays, _one(ckpt, unit, src, _float_dtype(unit))):
                dst[e] = part
    for a, (name, dt, shape) in zip(arrays, specs):
        if a.dtype != NP_OUT[dt] or tuple(a.shape) != tuple(shape):
            raise ConvertError(f"internal error: {name} came out {a.dtype}{list(a.shape)}, planned {dt}{list(shape)}")
    return arrays


def _float_dtype(unit: Unit) -> str:
    # the dtype planned for float outputs (weight when unquantised, scales/biases when affine)
    if unit.quant is None:
        return unit.outputs[0][1]
    return unit.outputs[1][1] if unit.quant.mode == "affine" else "BF16"
