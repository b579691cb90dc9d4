"""Recipes: for each quantisable module, which MLX quantisation (if any) the output uses."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConvertError
from ..spec import AUX, DENSE, EMBED, EXPERT, HEAD

AFFINE_BITS = {"q8": 8, "q6": 6, "q4": 4, "q3": 3, "q2": 2}
RECIPES = ("native", *AFFINE_BITS, "none")
FLOAT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
MXFP8 = ("mxfp8", 8, 32)
MXFP4 = ("mxfp4", 4, 32)


@dataclass(frozen=True)
class Quant:
    mode: str
    bits: int
    group_size: int

    def as_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass
class Recipe:
    name: str = "native"
    group_size: int = 64
    dense_bits: object = 8  # int, or "native" to keep the release's FP8 as mxfp8
    embed_bits: object = 8  # int, or None for float
    dtype: str = "bfloat16"

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ConvertError(f"unknown recipe {self.name!r} (choose from {', '.join(RECIPES)})")
        if self.dtype not in FLOAT_DTYPES:
            raise ConvertError(f"unsupported --dtype {self.dtype!r} (choose from {', '.join(FLOAT_DTYPES)})")
        if self.group_size not in (32, 64, 128):
            raise ConvertError(f"unsupported --group-size {self.group_size} (32, 64 or 128)")
        for flag, v in (("--dense-bits", self.dense_bits), ("--embed-bits", self.embed_bits)):
            if v not in (None, "native", 2, 3, 4, 5, 6, 8):
                raise ConvertError(f"unsupported {flag} {v!r} (2, 3, 4, 5, 6, 8 or native)")

    @property
    def float_dtype(self) -> str:
        return FLOAT_DTYPES[self.dtype]

    def describe(self) -> str:
        if self.name == "none":
            return f"none ({self.dtype})"
        if self.name == "native":
            return "native (FP8 -> mxfp8, FP4 -> mxfp4, bit-exact)"
        return (f"{self.name} (experts {AFFINE_BITS[self.name]}-bit affine g{self.group_size}, dense "
                f"{self.dense_bits if self.dense_bits == 'native' else str(self.dense_bits) + '-bit'}, "
                f"embed/head {self.embed_bits or 'float'})")

    def _native(self, kind: str, k: int):
        if k % 32:
            return None
        if kind == "fp8":
            return Quant(*MXFP8)
        if kind == "fp4":
            return Quant(*MXFP4)
        return None

    def _affine(self, bits, k: int):
        if bits is None or k % self.group_size:
            return None
        return Quant("affine", int(bits), self.group_size)

    def _dense(self, kind, k):
        if self.dense_bits == "native":
            return self._native(kind, k)
        return self._affine(self.dense_bits, k)

    def decide(self, family: str, kind: str, k: int):
        """Quantisation of a module of `family` whose source is `kind` (fp8/fp4/float), or None."""
        if self.name == "none" or family is None:
            return None
        if self.name == "native":
            return self._native(kind, k)
        if family == EXPERT:
            return self._affine(AFFINE_BITS[self.name], k)
        if family == DENSE:
            return self._dense(kind, k)
        if family == AUX:
            # the release keeps these in BF16: quantise only when the source already was
            return self._dense(kind, k) if kind in ("fp8", "fp4") else None
        if family in (EMBED, HEAD):
            return self._affine(self.embed_bits, k)
        return None
