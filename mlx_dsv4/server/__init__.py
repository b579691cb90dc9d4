"""OpenAI- and Anthropic-compatible HTTP server for DeepSeek-V4 (``mlx-dsv4 serve``).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``POST /v1/messages`` (+ ``/v1/messages/count_tokens``), ``GET /health``, ``GET /metrics`` (Prometheus).

Modules: ``app`` (Starlette routes, body parsing, limits, SSE plumbing), ``access``
(Host check, API keys, JSON body type), ``prompt_tokens`` (tokenising a prompt only up to
the context), ``openai_api`` and ``anthropic_api`` (request translation to V4 chat
messages, response and stream shapes), ``common`` (field validation, sampling, DSML
parser -> reply assembly), ``engine`` (the model on one thread, a queue of generations,
cancellation, the prompt cache per API key), ``errors`` (error bodies in each API's
shape). The command is ``mlx_dsv4.cli.serve``.
"""
