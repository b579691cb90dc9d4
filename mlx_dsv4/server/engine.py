"""The model behind the server: generations batched on a dedicated thread.

All MLX work (loading, prefill, decoding) happens on the engine thread; request
handlers submit jobs and read the steps back through an asyncio queue. Up to
``max_batch`` generations decode together (``mlx_dsv4.batch``): a request that arrives
while others decode is prefilled (one chunk between two of their steps) and joins them;
one that finishes or is cancelled leaves, and the others go on. With ``max_batch`` 1
(and on a distributed server, whose other ranks replay one request at a time) one
generation runs at a time. A job whose client went away is cancelled between two tokens
(or skipped if still queued), so its slot frees at once. A request that extends an
earlier conversation only prefills the new suffix: prompt-cache snapshots are kept per
partition (one per API key; a single one when the server has no keys), so a request only
reuses, or learns of, prefixes made by requests of its own partition.

With a ``draft`` (speculative decoding, a name of ``mlx_dsv4.generate.DRAFTERS``) requests
decode one at a time (``max_batch`` must be 1): a drafting generation verifies several
tokens per forward pass of its own, which the batch's one-token steps do not take. A
request that cannot draft (a grammar constraint, a repetition penalty, a scripted
completion) decodes without it.
"""

import asyncio
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from .errors import APIError, ContextOverflow

# Test-only: a JSON file of [{"match": "<text in the prompt>", "completion": "<text>"}].
# A request whose prompt contains ``match`` has its sampled tokens replaced by the
# tokens of ``completion`` (then EOS) through the real model, cache and sampler path,
# so tests can script the output of a random tiny model. Off unless the variable is set.
SCRIPT_ENV = "MLX_DSV4_SERVER_TEST_SCRIPT"

DEFAULT_PROMPT_CACHE_BYTES = 2 << 30
DEFAULT_MAX_BATCH = 8


class StepLog:
    """What a finished generation reports: its last step, tokens, and why it stopped."""

    def __init__(self):
        self.last = None
        self.tokens = []
        self.stop_sequence = None
        self.drafter = None  # the engine's drafter when it drafts: the usage reports its figures

    def add(self, step):
        self.last = step
        if step.token is not None:
            self.tokens.append(step.token)

    @property
    def finish_reason(self):
        return self.last.finish_reason if self.last else None


@dataclass
class Job:
    prompt: Optional[str]
    prompt_ids: Optional[list]
    sampling: object
    loop: asyncio.AbstractEventLoop
    partition: object = None
    constraint: object = None  # an llguidance matcher the output must satisfy
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def put(self, kind, value=None):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()


def _load_script(path):
    with open(path, encoding="utf-8") as f:
        rules = json.load(f)
    if not isinstance(rules, list) or not all(
        isinstance(r, dict) and isinstance(r.get("match"), str) and isinstance(r.get("completion"), str) for r in rules
    ):
        raise ValueError(f"{path}: expected a list of {{'match': str, 'completion': str}}")
    return rules


def _forcing_processor(forced_ids, n_prompt):
    """A logits processor that makes the sampler pick ``forced_ids`` one after another."""
    import mlx.core as mx

    def process(history, logits):
        position = history.shape[-1] - n_prompt
        token = forced_ids[min(position, len(forced_ids) - 1)]
        mask = mx.arange(logits.shape[-1]) == token
        return mx.where(mask, mx.zeros_like(logits), mx.full(logits.shape, -1e9, dtype=logits.dtype))

    return process


class _ClientGone(Exception):
    """The client of the prompt being prefilled went away."""


class Engine:
    """Loads the model on its own thread and runs queued generations one by one."""

    constrains = True  # applies grammar constraints
    stops_in_prefill = True  # a cancelled job stops between prefill chunks
    batches = True  # decodes several generations together when max_batch > 1

    def __init__(self, model_path, *, kv_cache_limit=None, max_queue=256, prefill_step=2048, script_path=None,
                 prompt_cache=None, cache_dtypes=("fp8", "fp4"), max_batch=DEFAULT_MAX_BATCH, draft="none",
                 num_draft=3):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive number of generations, got {max_batch!r}")
        if draft != "none" and max_batch > 1:
            raise ValueError(f"draft {draft!r} decodes one request at a time: max_batch must be 1, got {max_batch}")
        self.draft, self.num_draft = draft, num_draft
        self.model_path = model_path
        # PrefixStore options ("off": no prompt cache); by default snapshots stay in memory only
        self.prompt_cache_options = prompt_cache or {"memory_bytes": DEFAULT_PROMPT_CACHE_BYTES, "directory": None}
        self.prefix_store = None
        self.cache_dtypes = tuple(cache_dtypes)
        self.kv_cache_limit = kv_cache_limit
        self.max_queue = max_queue
        self.prefill_step = prefill_step
        self.script = _load_script(script_path) if script_path else []
        self.model = None
        self.tokenizer = None
        self.kv_tokens = None  # longest sequence whose cache and prefill transient fit kv_cache_limit
        self._jobs = queue.Queue()
        self._ready = threading.Event()
        self._load_error = None
        self._thread = None
        self._lock = threading.Lock()
        self.pending = 0  # submitted and not finished
        self.active = False
        self.prefill = None  # while a prompt prefills: tokens done and to do, and when it started
        self._current = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        from ..metrics import ServerMetrics

        self.metrics = ServerMetrics()  # what /metrics reports of the generations
        self.max_batch = max_batch if self.batches else 1
        self._running = {}  # batched: the jobs decoding, by id of their generation
        self._last_steps = {}  # batched: the newest step of each, by id of their generation
        self.decoding = 0  # batched: generations in the running batch
        self.largest_batch = 0  # the most generations that decoded together

    # -- lifecycle -----------------------------------------------------------------

    def start(self, timeout=None):
        self._thread = threading.Thread(target=self._run, name="mlx-dsv4-engine", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._load_error is not None:
            raise self._load_error
        if not self._ready.is_set():
            raise TimeoutError("the model did not load in time")

    def stop(self):
        if self._thread is not None:
            current = self._current
            if current is not None:
                current.cancelled.set()
            for job in list(self._running.values()):
                job.cancelled.set()
            self._jobs.put(None)
            self._thread.join(timeout=10)

    def _run(self):
        try:
            from ..generate import model_fingerprint

            self.model, self.tokenizer = self._load()
            self.model.set_cache_dtypes(*self.cache_dtypes)
            if self.draft != "none":
                from ..generate import check_draft

                check_draft(self.model, self.draft, self.num_draft)
            if self.kv_cache_limit == "auto":
                from ..device_memory import auto_kv_limit

                self.kv_cache_limit = auto_kv_limit(self.model)
            model_fingerprint(self.model)  # computed once here; prompt caches check it
            if self.prompt_cache_options != "off":
                from ..prefix_store import PrefixStore

                self.prefix_store = PrefixStore(self.model, **self.prompt_cache_options)
            if self.kv_cache_limit is not None:
                from ..generate import tokens_that_fit

                # Measured here once, on the engine thread: request threads never touch the model.
                self.kv_tokens = tokens_that_fit(self.model, self.kv_cache_limit, self.prefill_step)
        except BaseException as err:  # noqa: BLE001 - reported to start()
            self._load_error = err
            self._ready.set()
            return
        self._ready.set()
        if self.max_batch > 1:
            self._run_batched()
            return
        while True:
            job = self._jobs.get()
            if job is None:
                self._stopping()
                return
            try:
                if job.cancelled.is_set():
                    self._finish(job, "cancelled")
                    continue
                self._generate(job)
            finally:
                if self._jobs.empty():
                    self._release_memory()

    def _load(self):
        from .. import load

        return load(self.model_path, mtp=self.draft in ("mtp", "dspark"))

    def _stopping(self):
        """Called on the engine thread when the engine stops."""

    def _announce(self, ids, options, partition):
        """Called on the engine thread before each generation runs."""

    def _stop_after(self, job, step) -> bool:
        """Whether the generation of ``job`` ends after ``step`` (the client went away)."""
        return job.cancelled.is_set() and step.finish_reason is None

    def _prompt_cache(self, partition):
        return self.prefix_store.view(partition) if self.prefix_store is not None else None

    @staticmethod
    def _release_memory():
        import mlx.core as mx

        mx.clear_cache()

    # -- generation (engine thread) ---------------------------------------------------

    def _script_for(self, prompt_text):
        for rule in self.script:
            if rule["match"] in prompt_text:
                return rule["completion"]
        return None

    def _prepare(self, job, prompt_cache):
        """(prompt ids, generate options, logits processors) of ``job``."""
        tokenizer = self.tokenizer
        if job.prompt_ids is not None:
            ids = list(job.prompt_ids)
            text = tokenizer.decode(ids) if self.script else ""
        else:
            ids = (prompt_cache.encode(job.prompt, tokenizer) if prompt_cache is not None
                   else tokenizer.encode(job.prompt, add_special_tokens=False))
            text = job.prompt
        options = job.sampling.generate_kwargs()
        processors = None
        scripted = self._script_for(text) if self.script else None
        if scripted is not None:
            forced = tokenizer.encode(scripted, add_special_tokens=False) + [tokenizer.eos_token_id]
            processors = [_forcing_processor(forced, len(ids))]
        elif job.constraint is not None:
            if not self.constrains:
                raise APIError(400, "structured output (response_format, output_config.format, a forced tool "
                                    "choice) does not run on a distributed server yet", code="unsupported")
            from ..constrain import GrammarLogitsProcessor

            processors = [GrammarLogitsProcessor(job.constraint, tokenizer.vocab_size)]
        return ids, options, processors

    @staticmethod
    def _failure(job, err) -> str:
        """The outcome of a generation that raised ``err``; the client learns why."""
        from ..generate import KVCacheLimitError, PromptCacheError

        if isinstance(err, _ClientGone):
            return "cancelled"
        if isinstance(err, APIError):
            job.put("error", err)
        elif isinstance(err, KVCacheLimitError):
            job.put("error", ContextOverflow(err.tokens_needed, err.tokens_that_fit,
                                             what="the KV cache memory limit, prompt + max_tokens"))
        elif isinstance(err, PromptCacheError):
            job.put("error", APIError(400, str(err), code="invalid_prompt_cache"))
        else:  # one bad generation must not stop the server
            job.put("error", APIError(500, f"generation failed: {type(err).__name__}: {err}"))
        return "failed"

    def _generate(self, job):
        from ..generate import stream_generate

        self.active = True
        self._current = job
        tokenizer = self.tokenizer
        prompt_cache = self._prompt_cache(job.partition)
        outcome = "completed"
        try:
            ids, options, processors = self._prepare(job, prompt_cache)
            progress = self._prefill_progress(job, len(ids), stops=self.stops_in_prefill)
            self._announce(ids, options, job.partition)
            steps = self.metrics.watch(self.model, stream_generate(
                self.model, tokenizer, ids, prefill_step=self.prefill_step, prompt_cache=prompt_cache,
                kv_cache_limit=self.kv_cache_limit, logits_processors=processors, progress=progress, **options,
                **self._draft_options(options, processors),
            ))
            try:
                for step in steps:
                    self.prefill = None
                    job.put("step", step)
                    if self._stop_after(job, step):
                        outcome = "cancelled"
                        break
            finally:
                steps.close()
        except Exception as err:  # noqa: BLE001 - one bad generation must not stop the server
            outcome = self._failure(job, err)
        finally:
            self.active = False
            self.prefill = None
            self._current = None
            self._finish(job, outcome)

    def _draft_options(self, options, processors) -> dict:
        """stream_generate's draft arguments for a request: none when it cannot draft."""
        if self.draft == "none" or processors or options.get("repetition_penalty") is not None:
            return {}
        return {"draft": self.draft, "num_draft": self.num_draft}

    # -- batched generation (engine thread) ---------------------------------------------

    def _run_batched(self):
        """The engine loop with ``max_batch`` > 1: admit queued jobs while the batch has room,
        one decode step of the batch at a time."""
        from collections import deque

        from ..batch import DecodeBatch
        from ..device_memory import wired_limit

        batch = DecodeBatch(self.model)
        waiting = deque()
        stopping = False
        while not stopping:
            stopping = self._collect(waiting, block=True)
            with wired_limit(self.model):
                while (batch.runs or waiting) and not stopping:
                    if waiting and len(batch) < self.max_batch and self._fits(waiting[0], batch):
                        self._admit(waiting.popleft(), batch)
                    if batch.runs:
                        self._decode_step(batch)
                    stopping = self._collect(waiting, block=False)
            if not stopping:
                self._release_memory()
        for run in list(batch.runs):
            self._leave(batch, run, "cancelled")
        for job in waiting:
            self._finish(job, "cancelled")
        self._stopping()

    def _collect(self, waiting, block) -> bool:
        """Move queued jobs to ``waiting`` (waiting for one when ``block``); True when the engine stops."""
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return False
            block = False
            if job is None:
                return True
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
            else:
                waiting.append(job)

    def _fits(self, job, batch) -> bool:
        """Whether ``job`` may join ``batch`` under the KV cache limit: the caches of every
        generation at its longest, plus the prefill of this one, stay within it."""
        if self.kv_cache_limit is None or not batch.runs:
            return True
        from ..generate import estimate_cache_bytes, estimate_run_bytes

        # a text prompt's length in characters bounds its tokens without tokenising it here
        n = (len(job.prompt_ids) if job.prompt_ids is not None else len(job.prompt or "")) + job.sampling.max_tokens
        held = sum(estimate_cache_bytes(self.model, len(run.ids) + run.max_tokens) for run in batch.runs)
        return held + estimate_run_bytes(self.model, n, self.prefill_step) <= self.kv_cache_limit

    def _prefill_progress(self, job, n_tokens: int, *, stops: bool = True, between=None):
        """The progress callback of ``job``'s prefill: it keeps the prefill figures /health shows,
        ends the prefill between two chunks once the client has gone (with ``stops``) and calls
        ``between()`` after each chunk."""
        started = time.perf_counter()
        self.prefill = {"done": 0, "total": n_tokens, "started": started}

        def progress(done, total):
            self.prefill = {"done": done, "total": total, "started": started}
            if stops and job.cancelled.is_set():
                raise _ClientGone  # stop between two prefill chunks, not after the whole prompt
            if between is not None:
                between()

        return progress

    def _admit(self, job, batch):
        """Prefill ``job`` (one decode step of ``batch`` between two of its chunks) and add it to the batch."""
        from ..generate import open_generation

        if job.cancelled.is_set():
            self._finish(job, "cancelled")
            return
        self.active = True
        self._current = job
        prompt_cache = self._prompt_cache(job.partition)
        try:
            ids, options, processors = self._prepare(job, prompt_cache)
            run = open_generation(self.model, self.tokenizer, ids, prefill_step=self.prefill_step,
                                  prompt_cache=prompt_cache, kv_cache_limit=self.kv_cache_limit,
                                  logits_processors=processors, **options)
            progress = self._prefill_progress(job, len(ids), between=lambda: batch.runs and self._decode_step(batch))
            self._announce(ids, options, job.partition)
            self.metrics.begin(self.model)
            run.prefill(self.prefill_step, set(), progress)
        except Exception as err:  # noqa: BLE001 - one bad generation must not stop the server
            self.metrics.discard_pending()
            self._finish(job, self._failure(job, err))
            return
        finally:
            self.prefill = None
            self._current = None
            self.active = bool(batch.runs)
        batch.add(run)
        self._running[id(run)] = job
        self.active = True
        self.decoding = len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))

    def _decode_step(self, batch):
        """Drop the generations whose client went away, then one token for each of the others."""
        for run in list(batch.runs):
            if self._running[id(run)].cancelled.is_set():
                self._leave(batch, run, "cancelled")
        if batch.runs:
            try:
                steps = batch.step()
            except Exception as err:  # noqa: BLE001 - the batch's generations fail, the server goes on
                self.metrics.discard_pending()
                for run in list(batch.runs):
                    batch.remove(run, keep=False)  # its cache may hold part of the failed step
                    job = self._running.pop(id(run))
                    self._finish(job, self._failure(job, err))
                    self.metrics.note_end(self._last_steps.pop(id(run), None))
                steps = []
            self.decoding = len(batch)  # the finished generations have left it
            for run, step in steps:
                job = self._running[id(run)]
                job.put("step", step)
                self.metrics.note_step(step, evaluated=True)
                self._last_steps[id(run)] = step
                if step.finish_reason is not None:
                    del self._running[id(run)]
                    self._finish(job, "completed")
                    self.metrics.note_end(self._last_steps.pop(id(run)))
                elif job.cancelled.is_set():
                    self._leave(batch, run, "cancelled")
        self.decoding = len(batch)
        self.active = bool(batch.runs)

    def _leave(self, batch, run, outcome):
        batch.remove(run)
        self.decoding = len(batch)  # before the outcome counts: /health never shows a finished job decoding
        self._finish(self._running.pop(id(run)), outcome)
        self.metrics.note_end(self._last_steps.pop(id(run), None))

    def _finish(self, job, outcome):
        with self._lock:
            self.pending -= 1
            self.counts[outcome] += 1
        job.put("end")

    # -- request side (event loop) -------------------------------------------------

    async def stream(self, prompt, prompt_ids, sampling, log, partition=None, constraint=None):
        """Steps of one generation; closing the iterator early cancels it. Prompt-cache
        snapshots are reused only within ``partition``. ``constraint``: an llguidance matcher
        that masks each step (a scripted completion replaces it)."""
        with self._lock:
            if self.pending >= self.max_queue:
                raise APIError(503, f"the server is busy ({self.pending} requests waiting); retry later")
            self.pending += 1
        job = Job(prompt, prompt_ids, sampling, asyncio.get_running_loop(), partition=partition, constraint=constraint)
        if self.draft != "none":
            log.drafter = self.draft
        self._jobs.put(job)
        try:
            while True:
                kind, value = await job.queue.get()
                if kind == "step":
                    log.add(value)
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            job.cancelled.set()

    def stats(self):
        import mlx.core as mx

        store = self.prefix_store.stats() if self.prefix_store is not None else None
        return {
            "loaded": self._ready.is_set() and self._load_error is None,
            "active": self.active,
            "batch": {"max": self.max_batch, "decoding": self.decoding, "largest": self.largest_batch},
            "prefill": _prefill_figures(self.prefill),
            "pending": self.pending,
            **self.counts,
            "prompt_cache_snapshots": store["snapshots"] if store else 0,
            "prompt_cache": store,
            "max_kv_tokens": self.kv_tokens,
            "draft": self._draft_figures(),
            "memory": {"active_bytes": mx.get_active_memory(), "rss_bytes": _rss_bytes()},
        }


    def _draft_figures(self):
        """The drafter and its totals over every finished generation, or None without a draft."""
        if self.draft == "none":
            return None
        totals = self.metrics.snapshot()["totals"]
        proposed, accepted = totals["draft_proposed"], totals["draft_accepted"]
        return {"drafter": self.draft, "num_draft": self.num_draft, "proposed": proposed, "accepted": accepted,
                "acceptance_rate": round(accepted / proposed, 4) if proposed else None}


def _prefill_figures(prefill):
    """Progress of the prompt being prefilled, or None."""
    if not prefill:
        return None
    done, total = prefill["done"], prefill["total"]
    seconds = time.perf_counter() - prefill["started"]
    rate = done / seconds if seconds > 0 else 0.0
    return {"tokens_done": done, "tokens_total": total, "tokens_per_s": round(rate, 1),
            "eta_s": round((total - done) / rate, 1) if rate > 0 else None}


def _rss_bytes():
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
