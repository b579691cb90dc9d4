"""DeepSeek-V4 for mlx-lm. Needs the mlx-dsv4 package (pip install mlx-dsv4); the code is
in mlx_dsv4/mlx_lm_adapter.py. Load with --trust-remote-code (CLIs) or trust_remote_code=True."""

from mlx_dsv4.mlx_lm_adapter import Model, ModelArgs  # noqa: F401
