"""DeepSeek-V4 on Apple Silicon with MLX."""

from .config import ConfigError, ModelArgs
from .loader import CheckpointError, load, load_model

__all__ = ["ConfigError", "CheckpointError", "ModelArgs", "load", "load_model"]
