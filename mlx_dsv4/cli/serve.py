"""`mlx-dsv4 serve`: the OpenAI- and Anthropic-compatible HTTP server."""

import os
import sys

from ..sampling import SamplingParams
from .common import (
    add_draft_arguments,
    add_memory_arguments,
    add_prompt_cache_arguments,
    add_model_argument,
    add_sampling_arguments,
    check_draft_flags,
    check_sampling_flags,
    draft_flag,
    prefix_store_options,
    sampling_from_args,
)
from .distributed import add_distributed_arguments, distributed_problem

# for requests that do not set them
DEFAULT_SAMPLING = SamplingParams(max_tokens=4096, temperature=0.6, top_p=0.95)
DEFAULT_MAX_BATCH = 8  # without --draft


def add_arguments(p):
    add_model_argument(p, help="MLX DeepSeek-V4 checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require this key (Authorization: Bearer or x-api-key); repeat for several keys, each "
                        "with its own prompt cache; default: $MLX_DSV4_API_KEY, comma-separated")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated Host names (NAME or NAME:PORT) answered besides 127.0.0.1, localhost, "
                        "[::1] and the --host address; '*' answers any")
    p.add_argument("--served-model-name", default=None, help="model id clients must send (default: the directory name)")
    add_sampling_arguments(p, DEFAULT_SAMPLING, per_run=False, title="sampling of requests that do not set it")
    add_memory_arguments(p, what="requests")
    add_prompt_cache_arguments(p)
    p.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait before new ones get 503")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="requests that decode together, each step reading the weights once for all of them "
                        f"(default {DEFAULT_MAX_BATCH}; 1: one at a time; a distributed server, and one with "
                        "--draft, runs one at a time)")
    add_draft_arguments(p, what="each request (one request decodes at a time)")
    p.add_argument("--sse-keepalive", type=float, default=5.0, metavar="SECONDS",
                   help="a streaming reply with nothing to send for SECONDS (a long prefill) gets an SSE "
                        "comment, so clients and proxies do not time out (default 5)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_distributed_arguments(p)


def api_keys(args):
    """The --api-key values, else $MLX_DSV4_API_KEY split at commas; blanks and repeats dropped."""
    given = args.api_key if args.api_key is not None else os.environ.get("MLX_DSV4_API_KEY", "").split(",")
    return tuple(dict.fromkeys(k.strip() for k in given if k.strip()))


def run(args):
    import uvicorn

    from ..generate import GenerationParameterError
    from ..server.access import LOOPBACK_NAMES, WILDCARD_ADDRESSES, HostPolicy
    from ..server.app import Context, create_app
    from ..server.engine import SCRIPT_ENV, Engine

    if not args.model.is_dir():
        print(f"error: {args.model} is not a checkpoint directory", file=sys.stderr)
        return 2
    if not args.sse_keepalive > 0:
        print(f"error: --sse-keepalive must be a positive number of seconds, got {args.sse_keepalive}", file=sys.stderr)
        return 2
    problem = check_sampling_flags(args) or check_draft_flags(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    keys = api_keys(args)
    try:
        hosts = HostPolicy(args.host, args.port, [h.strip() for h in args.allowed_hosts.split(",") if h.strip()])
    except ValueError as err:
        print(f"error: --allowed-hosts: {err}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK_NAMES and not keys:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    if args.host in WILDCARD_ADDRESSES and not hosts.entries and not hosts.open:
        print(f"note: requests must name this server as {hosts.describe()}; add the names clients use "
              "with --allowed-hosts", file=sys.stderr)
    if os.environ.get(SCRIPT_ENV):
        print(f"warning: {SCRIPT_ENV} is set: test-only scripted completions replace sampling for matching prompts",
              file=sys.stderr)
    if args.max_batch is not None and args.max_batch < 1:
        print(f"error: --max-batch must be a positive number of requests, got {args.max_batch}", file=sys.stderr)
        return 2
    if args.draft != "none" and (args.max_batch or 1) > 1:
        print(f"error: --draft decodes one request at a time: it does not run with --max-batch {args.max_batch} "
              "(leave --max-batch out, or give 1)", file=sys.stderr)
        return 2
    max_batch = args.max_batch or (1 if args.draft != "none" else DEFAULT_MAX_BATCH)
    options = dict(kv_cache_limit=args.max_kv_size, max_queue=args.max_queue, prefill_step=args.prefill_step,
                   max_batch=max_batch, draft=args.draft, num_draft=args.num_draft,
                   cache_dtypes=(args.kv_dtype, args.index_dtype),
                   # ranks would have to evict snapshots in lockstep; distributed serving prefills every prompt
                   prompt_cache="off" if args.distributed else prefix_store_options(args))
    problem = distributed_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.distributed:
        from ..distributed import DistributedError, init
        from ..server.distributed import LeaderEngine

        try:
            ranks = init()
            if ranks.rank != 0:
                return _follow(args, ranks, Engine(args.model, **options))
        except DistributedError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        engine = LeaderEngine(args.model, ranks, args.distributed, args.pipeline_split, **options)
    else:
        engine = Engine(args.model, script_path=os.environ.get(SCRIPT_ENV) or None, **options)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        engine.start()
    except GenerationParameterError as err:  # the checkpoint has not the drafter --draft names
        print(f"error: {args.model}: {draft_flag(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - a checkpoint that does not load is a usage error
        print(f"error: cannot load {args.model}: {err}", file=sys.stderr)
        return 1
    model_args = engine.model.args
    max_context = args.max_context or getattr(model_args, "max_position_embeddings", None)
    defaults = sampling_from_args(args)
    name = args.served_model_name or args.model.resolve().name
    ctx = Context(engine, name, defaults, api_keys=keys, max_context=max_context, hosts=None if hosts.open else hosts,
                  keepalive_seconds=args.sse_keepalive)
    print(f"serving {name!r} on http://{args.host}:{args.port} (OpenAI /v1/chat/completions, /v1/completions; "
          f"Anthropic /v1/messages)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(ctx), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0


def _follow(args, ranks, engine) -> int:
    """A rank other than 0: load this rank's part, then run what rank 0 sends until it stops;
    Ctrl-C is rank 0's to handle."""
    import signal

    from ..distributed import load_distributed
    from ..server.distributed import follow
    from ..tokenizer import load_tokenizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    model = load_distributed(args.model, ranks, args.distributed, args.pipeline_split)
    model.set_cache_dtypes(args.kv_dtype, args.index_dtype)
    return follow(engine, ranks, model, load_tokenizer(args.model))
