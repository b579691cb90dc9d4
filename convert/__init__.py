"""Hub DeepSeek-V4 checkpoints to MLX checkpoints (installed as ``mlx_dsv4.convert``)."""
