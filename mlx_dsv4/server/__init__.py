"""OpenAI- and Anthropic-compatible HTTP server for DeepSeek-V4."""
