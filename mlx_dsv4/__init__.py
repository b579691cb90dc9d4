"""DeepSeek-V4 on Apple Silicon with MLX.

The loader (and with it MLX and the model code) is imported on first use of ``load``,
``load_model`` or ``CheckpointError``, so that importing a light module of the package
(``mlx_dsv4.config``, ``mlx_dsv4.spec``, the converter's estimates, the CLI's parser)
does not pay for MLX.
"""

import importlib

from .config import ConfigError, ModelArgs

_FROM_LOADER = ("CheckpointError", "load", "load_model")

__all__ = ["ConfigError", "CheckpointError", "ModelArgs", "load", "load_model"]


def __getattr__(name):
    if name in _FROM_LOADER:
        return getattr(importlib.import_module(f"{__name__}.loader"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
