"""Routes: OpenAI chat/completions/models, Anthropic messages, health."""

import asyncio
import ctypes
import hashlib
import re
import time
from contextlib import asynccontextmanager, suppress

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..chat.wiretext import strict_json_loads
from . import anthropic_api, openai_api
from .access import HostCheck, check_json_body_type, key_partition
from .common import Assembler, compile_constraint
from .engine import StepLog
from .errors import APIError, ContextOverflow, error_response
from .prompt_tokens import PromptTokenizer, PromptTooLong, UnbrokenRun

MAX_BODY_BYTES = 32 * 1024 * 1024
BODY_BUDGET_BYTES = 4 * MAX_BODY_BYTES  # request bodies held at once (read, decoded, tokenised); past it, 503
SMALL_BODY_BYTES = 1024 * 1024  # a body this small is never refused for the budget
PREPARING = 2  # requests decoded, rendered and tokenised at once; the others wait
DISCONNECT_POLL_S = 0.2

try:  # glibc keeps memory freed by worker threads in their arenas; malloc_trim gives it back
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


DEFAULT_KEEPALIVE_SECONDS = 5.0


class Context:
    """What request parsing needs to know about the served model; ``defaults`` (SamplingParams)
    fill the sampling fields a request leaves out. ``api_keys``: accepted keys (none: no key
    needed); ``hosts``: a HostPolicy (None: any Host). The engine must have loaded the model."""

    def __init__(self, engine, model_name, defaults, *, api_keys=(), max_context=None, hosts=None,
                 keepalive_seconds=DEFAULT_KEEPALIVE_SECONDS):
        self.engine = engine
        self.model_name = model_name
        self.defaults = defaults
        self.api_keys = tuple(api_keys)
        # prompt caches are partitioned by key; on disk by a digest that stays the same across restarts
        self.key_digests = tuple(hashlib.sha256(k.encode("utf-8")).hexdigest()[:16] for k in self.api_keys)
        self.max_context = max_context
        self.hosts = hosts
        self.keepalive_seconds = keepalive_seconds  # SSE comment while a stream has nothing to send
        self.created = int(time.time())
        self.prompt_tokenizer = PromptTokenizer(engine.tokenizer)

    @property
    def vocab_size(self):
        return self.engine.model.args.vocab_size

    def token_limit(self):
        """(tokens, what) of the tightest limit on a sequence, or (None, None)."""
        limits = [(n, what) for n, what in ((self.max_context, "the context"),
                                            (self.engine.kv_tokens, "the KV cache memory limit")) if n is not None]
        return min(limits) if limits else (None, None)

    def count_prompt_tokens(self, text, param):
        """Token ids of ``text``; 400 as soon as it is known to reach the tightest limit."""
        limit, what = self.token_limit()
        try:
            return self.prompt_tokenizer.encode(text, limit)
        except PromptTooLong as err:
            raise ContextOverflow(err.at_least, limit, what=what, param=param, at_least=True)
        except UnbrokenRun as err:
            raise APIError(400, str(err), param=param, code="invalid_value")

    def check_prompt_chars(self, chars, param):
        """400 when a prompt holding ``chars`` characters of caller text is sure to reach the
        tightest limit: a huge prompt is refused before it is rendered (copied) at all."""
        limit, what = self.token_limit()
        at_least = self.prompt_tokenizer.tokens_at_least(chars)
        if limit is not None and at_least >= limit:
            raise ContextOverflow(at_least, limit, what=what, param=param, at_least=True)

    def check_model(self, name):
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")


def _flavour(path):
    return "anthropic" if path.startswith("/v1/messages") else "openai"


class BodyBudget:
    """Bytes of request bodies the server holds at once, from the first byte read until the
    request is tokenised; a large body that does not fit gets 503. Used on the event loop only."""

    def __init__(self, total=BODY_BUDGET_BYTES):
        self.total = total
        self.used = 0

    def take(self, n, body_size):
        if self.used + n > self.total and body_size > SMALL_BODY_BYTES:
            raise APIError(503, f"the server is busy with other large requests ({self.used} bytes of "
                                f"request bodies in hand, at most {self.total}); retry later")
        self.used += n

    def give(self, n):
        self.used -= n


@asynccontextmanager
async def _body(request, budget):
    """The raw body, counted in ``budget`` until the block ends."""
    held = 0
    try:
        length = request.headers.get("content-length")
        if length is not None and length.isascii() and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks = []
        async for chunk in request.stream():
            if held + len(chunk) > MAX_BODY_BYTES:
                raise APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
            budget.take(len(chunk), held + len(chunk))
            held += len(chunk)
            chunks.append(chunk)
        raw = b"".join(chunks)
        del chunks
        yield raw
    finally:
        budget.give(held)
        if held > SMALL_BODY_BYTES and budget.used == 0 and _malloc_trim is not None:
            _malloc_trim(0)


_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_surrogates(body):
    """A JSON escape can write half of a UTF-16 pair ("\\ud800"); no string may hold one."""
    stack = [(body, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                raise APIError(400, f"'{where}' holds an unpaired surrogate (U+{ord(found.group()):04X}), "
                                    "which is not Unicode text", param=where, code="invalid_json")
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if _SURROGATE.search(key):
                    inside = f"'{where}'" if where else "the body"
                    raise APIError(400, f"a key in {inside} holds an unpaired surrogate, which is not Unicode text",
                                   param=where or None, code="invalid_json")
                stack.append((item, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in reversed(list(enumerate(value))))


def _decode_json(raw):
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = strict_json_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json")
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    if _ESCAPED_SURROGATE.search(raw):
        _check_surrogates(body)
    return body


def _build(build, raw):
    """(build(body), None), or (None, an APIError without traceback): a raised error's frames
    would keep the request's body and prompt alive as long as anything holds the error."""
    try:
        return build(_decode_json(raw)), None
    except APIError as err:
        return None, err.detached()
    except Exception as err:  # noqa: BLE001 - a request must never take the server down
        return None, APIError(500, f"internal error: {type(err).__name__}: {err}")


def _prepare(plan, ctx):
    """Check sampling against the model, tokenise the prompt and check it (with max_tokens)
    against the context and the memory guard."""
    from ..generate import GenerationParameterError, check_sampling_parameters

    engine = ctx.engine
    try:
        check_sampling_parameters(engine.model, **plan.sampling.generate_kwargs())
    except GenerationParameterError as err:
        raise APIError(400, f"'{err.field}' {err.problem}", param=err.field, code="invalid_value")
    param = "messages" if plan.parse else "prompt"
    if not plan.prompt_ids:
        plan.prompt_ids = ctx.count_prompt_tokens(plan.prompt, param)
    n = len(plan.prompt_ids)
    sampling = plan.sampling
    for limit, what in ((ctx.max_context, "the context"), (engine.kv_tokens, "the KV cache memory limit")):
        if limit is None:
            continue
        if n >= limit:
            raise ContextOverflow(n, limit, what=what, param=param)
        if n + sampling.max_tokens > limit:
            if sampling.max_tokens_given:
                raise ContextOverflow(n, limit, what=what, max_tokens=sampling.max_tokens, param="max_tokens")
            sampling.max_tokens = limit - n
    compile_constraint(plan, engine.tokenizer)


async def _with_keepalive(steps, interval):
    """The items of the async iterator ``steps``, and None each time ``interval`` seconds pass
    without one. Closing this closes ``steps``."""
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(steps.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await pending
        with suppress(Exception):
            await steps.aclose()


def _note_stop_sequence(log, plan, tokenizer):
    stops = plan.sampling.stop
    if not stops or log.finish_reason != "stop" or not log.tokens or log.tokens[-1] in tokenizer.eos_token_ids:
        return
    text = tokenizer.decode(log.tokens)
    hits = [(text.find(s), s) for s in stops if s in text]
    if hits:
        log.stop_sequence = min(hits)[1]


def _assembler(plan, flavour):
    return Assembler(plan.thinking_mode, prefix=plan.prefix, echo_prefix=plan.echo_prefix,
                     id_prefix="toolu_" if flavour == "anthropic" else "call_", parse=plan.parse)


def _engine_args(plan):
    # Chat prompts go as text so the engine can reuse the prompt cache's own token ids.
    return (plan.prompt, None) if plan.prompt else (None, plan.prompt_ids)


class Server:
    def __init__(self, ctx):
        self.ctx = ctx
        self.budget = BodyBudget()
        self.preparing = asyncio.Semaphore(PREPARING)

    # -- plumbing ------------------------------------------------------------------

    async def _admit(self, request, build):
        """Check the key and the body type, read the body within the budget, then ``build(body)``
        (decode, parse, tokenise) on a worker thread, PREPARING requests at a time. Returns the
        key's partition and what ``build`` returned."""
        index = key_partition(request, self.ctx.api_keys)
        partition = None if index is None else self.ctx.key_digests[index]
        check_json_body_type(request)
        async with _body(request, self.budget) as raw, self.preparing:
            result, error = await run_in_threadpool(_build, build, raw)
            del raw
        if error is not None:
            raise error
        return partition, result

    async def _run(self, request, flavour, parse, respond, stream_format):
        ctx = self.ctx

        def build(body):
            plan = parse(body, ctx)
            _prepare(plan, ctx)
            return plan

        try:
            partition, plan = await self._admit(request, build)
            if ctx.engine.pending >= ctx.engine.max_queue:
                raise APIError(503, f"the server is busy ({ctx.engine.pending} requests waiting); retry later")
        except APIError as err:
            return error_response(err, flavour)
        except Exception as err:  # noqa: BLE001 - a request must never take the server down
            return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}"), flavour)
        if plan.stream:
            return StreamingResponse(
                self._sse(plan, flavour, stream_format(plan), partition),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            result = await self._collect(request, plan, flavour, partition)
        except APIError as err:
            return error_response(err, flavour)
        except Exception as err:  # noqa: BLE001
            return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}"), flavour)
        if result is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        assembler, log = result
        return JSONResponse(respond(plan, assembler, log))

    async def _collect(self, request, plan, flavour, partition):
        assembler, log = _assembler(plan, flavour), StepLog()

        async def consume():
            async for step in self.ctx.engine.stream(*_engine_args(plan), plan.sampling, log, partition,
                                                    constraint=plan.matcher):
                assembler.feed(step.text)
            assembler.finish()

        task = asyncio.ensure_future(consume())
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await task
                return None
        task.result()
        _note_stop_sequence(log, plan, self.ctx.engine.tokenizer)
        return assembler, log

    async def _sse(self, plan, flavour, fmt, partition):
        assembler, log = _assembler(plan, flavour), StepLog()
        # Anthropic's message_start carries the prompt's cached share, known once the prefill is done.
        pending_start = flavour == "anthropic"

        def opening(step=None):
            if step is None:
                return fmt.start(len(plan.prompt_ids))
            return fmt.start(step.prompt_tokens, step.cached_tokens or 0)

        try:
            if not pending_start:
                for line in fmt.start():
                    yield line
            steps = self.ctx.engine.stream(*_engine_args(plan), plan.sampling, log, partition,
                                           constraint=plan.matcher)
            async for step in _with_keepalive(steps, self.ctx.keepalive_seconds):
                if step is None:
                    # an SSE comment: clients ignore it, and idle-timeouts see traffic during a long prefill
                    yield ": keep-alive\n\n"
                    continue
                if pending_start:
                    pending_start = False
                    for line in opening(step):
                        yield line
                for line in fmt.events(assembler.feed(step.text), assembler):
                    yield line
            if pending_start:
                pending_start = False
                for line in opening():
                    yield line
            for line in fmt.events(assembler.finish(), assembler):
                yield line
            _note_stop_sequence(log, plan, self.ctx.engine.tokenizer)
            for line in fmt.end(assembler, log):
                yield line
        except Exception as err:  # noqa: BLE001 - report in-band; headers are already sent
            if not isinstance(err, APIError):
                err = APIError(500, f"internal error: {type(err).__name__}: {err}")
            for line in (opening() if pending_start else []) + fmt.error(err):
                yield line

    # -- routes --------------------------------------------------------------------

    async def chat_completions(self, request):
        def respond(plan, assembler, log):
            return openai_api.chat_response(plan, assembler, log, *openai_api.new_chat_id())

        return await self._run(request, "openai", openai_api.parse_chat_request, respond,
                               lambda plan: openai_api.ChatChunks(plan, *openai_api.new_chat_id()))

    async def completions(self, request):
        def respond(plan, assembler, log):
            return openai_api.completion_response(plan, assembler, log, *openai_api.new_completion_id())

        return await self._run(request, "openai", openai_api.parse_completion_request, respond,
                               lambda plan: openai_api.ChatChunks(plan, *openai_api.new_completion_id(), completion=True))

    async def messages(self, request):
        def respond(plan, assembler, log):
            return anthropic_api.message_response(plan, assembler, log, anthropic_api.new_message_id())

        return await self._run(request, "anthropic", anthropic_api.parse_messages_request, respond,
                               lambda plan: anthropic_api.MessageEvents(plan, anthropic_api.new_message_id()))

    async def count_tokens(self, request):
        ctx = self.ctx

        def build(body):
            plan = anthropic_api.parse_messages_request(body, ctx, count_only=True)
            return ctx.count_prompt_tokens(plan.prompt, "messages")

        try:
            _, ids = await self._admit(request, build)
        except APIError as err:
            return error_response(err, "anthropic")
        except Exception as err:  # noqa: BLE001
            return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}"), "anthropic")
        return JSONResponse({"input_tokens": len(ids)})

    def _model_entry(self, request):
        ctx = self.ctx
        if "anthropic-version" in request.headers:
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ctx.created))
            return {"type": "model", "id": ctx.model_name, "display_name": ctx.model_name, "created_at": created}
        return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "mlx-dsv4"}

    async def models(self, request):
        try:
            key_partition(request, self.ctx.api_keys)
        except APIError as err:
            return error_response(err, "openai")
        entry = self._model_entry(request)
        if "anthropic-version" in request.headers:
            return JSONResponse({"data": [entry], "has_more": False, "first_id": entry["id"], "last_id": entry["id"]})
        return JSONResponse({"object": "list", "data": [entry]})

    async def model(self, request):
        try:
            key_partition(request, self.ctx.api_keys)
            self.ctx.check_model(request.path_params["name"])
        except APIError as err:
            return error_response(err, "openai")
        return JSONResponse(self._model_entry(request))

    async def health(self, request):
        stats = self.ctx.engine.stats()
        return JSONResponse({"status": "ok" if stats["loaded"] else "loading", "model": self.ctx.model_name, **stats,
                             "request_body_bytes": self.budget.used},
                            status_code=200 if stats["loaded"] else 503)

    async def metrics(self, request):
        from ..metrics import prometheus_text

        body = await run_in_threadpool(prometheus_text, self.ctx.engine, self.ctx.model_name)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _http_error(request, exc):
    messages = {404: f"no route for {request.method} {request.url.path}", 405: f"{request.method} is not allowed here"}
    return error_response(APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail))),
                          _flavour(request.url.path))


async def _server_error(request, exc):
    return error_response(APIError(500, f"internal error: {type(exc).__name__}"), _flavour(request.url.path))


def create_app(ctx):
    server = Server(ctx)
    routes = [
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/messages", server.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", server.count_tokens, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{name:path}", server.model, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})
    return HostCheck(app, ctx.hosts, _flavour)
