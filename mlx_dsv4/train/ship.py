"""The shipped form of a trained checkpoint: the converter's MLX format, the vocabulary-sized
embedding and head quantised (they are nearly all of the bytes), experts 8-bit, the rest bfloat16
(a quantised embedding makes bfloat16 the activation dtype in any case)."""

from pathlib import Path

SHIP_EMBED_BITS = 4


def ship(official_dir, out_dir, embed_bits: int = SHIP_EMBED_BITS, log=lambda s: None) -> dict:
    """Convert the float32 official-layout checkpoint in `official_dir` to `out_dir` (replaced)."""
    from ..convert.convert import convert
    from ..convert.recipes import Recipe

    recipe = Recipe("q8", dense_bits=None, embed_bits=embed_bits, dtype="bfloat16")
    return convert(Path(official_dir), Path(out_dir), recipe, include_mtp=True, overwrite=True,
                   progress=False, log=log)
