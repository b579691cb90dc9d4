"""`mlx-dsv4 serve`: the OpenAI- and Anthropic-compatible HTTP server."""

import argparse
import os
import re
import sys
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text):
    """Bytes from '4GB', '512MiB', '1.5G' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 8GB, 512MiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_arguments(p):
    p.add_argument("--model", required=True, type=Path, help="MLX DeepSeek-V4 checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("MLX_DSV4_API_KEY"),
                   help="require this key (Authorization: Bearer or x-api-key); default $MLX_DSV4_API_KEY")
    p.add_argument("--served-model-name", default=None, help="model id clients must send (default: the directory name)")
    p.add_argument("--temperature", type=float, default=0.6, help="default sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="default nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="default top-k (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="default min-p (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=4096, help="max_tokens when a request gives none")
    p.add_argument("--max-kv-size", type=parse_size, default=None,
                   help="memory guard: refuse requests whose KV cache would exceed this size (e.g. 24GB)")
    p.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait before new ones get 503")
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args):
    import uvicorn

    from .app import Context, Defaults, create_app
    from .engine import SCRIPT_ENV, Engine

    if not args.model.is_dir():
        print(f"error: {args.model} is not a checkpoint directory", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    if os.environ.get(SCRIPT_ENV):
        print(f"warning: {SCRIPT_ENV} is set: test-only scripted completions replace sampling for matching prompts",
              file=sys.stderr)
    engine = Engine(args.model, kv_cache_limit=args.max_kv_size, max_queue=args.max_queue,
                    prefill_step=args.prefill_step, script_path=os.environ.get(SCRIPT_ENV) or None)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        engine.start()
    except Exception as err:  # noqa: BLE001 - a checkpoint that does not load is a usage error
        print(f"error: cannot load {args.model}: {err}", file=sys.stderr)
        return 1
    model_args = engine.model.args
    max_context = args.max_context or getattr(model_args, "max_position_embeddings", None)
    defaults = Defaults(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    name = args.served_model_name or args.model.resolve().name
    ctx = Context(engine, name, defaults, api_key=args.api_key, max_context=max_context)
    print(f"serving {name!r} on http://{args.host}:{args.port} (OpenAI /v1/chat/completions, /v1/completions; "
          f"Anthropic /v1/messages)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(ctx), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0
