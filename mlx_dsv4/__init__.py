"""DeepSeek-V4 on Apple Silicon with MLX."""
