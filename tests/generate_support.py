"""A tiny random V4 checkpoint with the real vocabulary, shared by the generation tests.

Three layers (sliding-only, CSA ratio 4, HCA ratio 128) keep it fast while covering
every kind of cache state; the vocabulary is the real one so that the V4 tokenizer's
ids are valid.
"""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

LAYERS = [0, 4, 128]


@functools.lru_cache(maxsize=None)
def tiny_chat_dir(seed: int = 0) -> Path:
    from mlx_dsv4.tiny import write_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="dsv4-generate-"))
    atexit.register(shutil.rmtree, root, True)
    return write_tiny_checkpoint(root / f"tiny-{seed}", preset="flash", seed=seed,
                                 compress_ratios=LAYERS, num_hash_layers=1)


@functools.lru_cache(maxsize=None)
def tiny_chat_model(seed: int = 0):
    from mlx_dsv4 import load

    return load(tiny_chat_dir(seed))
