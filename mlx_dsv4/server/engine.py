"""The model behind the server: one generation at a time on a dedicated thread.

All MLX work (loading, prefill, decoding) happens on the engine thread; request
handlers submit jobs and read the steps back through an asyncio queue. A job whose
client went away is cancelled between two tokens (or skipped if still queued), so its
slot frees at once. A request that extends an earlier conversation only prefills the new
suffix: prompt-cache snapshots are kept per partition (one per API key; a single one when
the server has no keys), so a request only reuses, or learns of, prefixes made by requests
of its own partition.
"""

import asyncio
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from .errors import APIError

# Test-only: a JSON file of [{"match": "<text in the prompt>", "completion": "<text>"}].
# A request whose prompt contains ``match`` has its sampled tokens replaced by the
# tokens of ``completion`` (then EOS) through the real model, cache and sampler path,
# so tests can script the output of a random tiny model. Off unless the variable is set.
SCRIPT_ENV = "MLX_DSV4_SERVER_TEST_SCRIPT"

PROMPT_CACHE_SNAPSHOTS = 4  # of all partitions together


class StepLog:
    """What a finished generation reports: its last step, tokens, and why it stopped."""

    def __init__(self):
        self.last = None
        self.tokens = []
        self.stop_sequence = None

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


class Engine:
    """Loads the model on its own thread and runs queued generations one by one."""

    def __init__(self, model_path, *, kv_cache_limit=None, max_queue=256, prefill_step=2048, script_path=None):
        self.model_path = model_path
        self.kv_cache_limit = kv_cache_limit
        self.max_queue = max_queue
        self.prefill_step = prefill_step
        self.script = _load_script(script_path) if script_path else []
        self.model = None
        self.tokenizer = None
        self.kv_tokens = None  # longest sequence whose cache fits kv_cache_limit
        self._prompt_caches = {}  # partition -> PromptCache, least recently used first
        self._jobs = queue.Queue()
        self._ready = threading.Event()
        self._load_error = None
        self._thread = None
        self._lock = threading.Lock()
        self.pending = 0  # submitted and not finished
        self.active = False
        self._current = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}

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
            self._jobs.put(None)
            self._thread.join(timeout=10)

    def _run(self):
        try:
            from ..generate import model_fingerprint

            self.model, self.tokenizer = self._load()
            model_fingerprint(self.model)  # computed once here; prompt caches check it
            if self.kv_cache_limit is not None:
                from ..generate import tokens_that_fit

                # Measured here once, on the engine thread: request threads never touch the model.
                self.kv_tokens = tokens_that_fit(self.model, self.kv_cache_limit)
        except BaseException as err:  # noqa: BLE001 - reported to start()
            self._load_error = err
            self._ready.set()
            return
        self._ready.set()
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

        return load(self.model_path)

    def _stopping(self):
        """Called on the engine thread when the engine stops."""

    def _announce(self, ids, options, partition):
        """Called on the engine thread before each generation runs."""

    def _stop_after(self, job, step) -> bool:
        """Whether the generation of ``job`` ends after ``step`` (the client went away)."""
        return job.cancelled.is_set() and step.finish_reason is None

    def _prompt_cache(self, partition):
        from ..generate import PromptCache

        cache = self._prompt_caches.pop(partition, None)
        if cache is None:
            cache = PromptCache(self.model, max_snapshots=PROMPT_CACHE_SNAPSHOTS)
        self._prompt_caches[partition] = cache
        return cache

    def _trim_prompt_caches(self):
        """Keep PROMPT_CACHE_SNAPSHOTS snapshots in all: the least recently used partitions give
        up their oldest ones first."""
        excess = sum(len(c) for c in self._prompt_caches.values()) - PROMPT_CACHE_SNAPSHOTS
        for partition, cache in list(self._prompt_caches.items()):
            while excess > 0 and len(cache):
                cache.snapshots.remove(min(cache.snapshots, key=lambda s: s.last_used))
                excess -= 1
            if not len(cache):
                del self._prompt_caches[partition]

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

    def _generate(self, job):
        from ..generate import KVCacheLimitError, PromptCacheError, stream_generate

        self.active = True
        self._current = job
        tokenizer = self.tokenizer
        prompt_cache = self._prompt_cache(job.partition)
        outcome = "completed"
        try:
            if job.prompt_ids is not None:
                ids = list(job.prompt_ids)
                text = tokenizer.decode(ids) if self.script else ""
            else:
                ids = prompt_cache.encode(job.prompt, tokenizer)
                text = job.prompt
            options = job.sampling.generate_kwargs()
            processors = None
            scripted = self._script_for(text) if self.script else None
            if scripted is not None:
                forced = tokenizer.encode(scripted, add_special_tokens=False) + [tokenizer.eos_token_id]
                processors = [_forcing_processor(forced, len(ids))]
            self._announce(ids, options, job.partition)
            steps = stream_generate(
                self.model, tokenizer, ids, prefill_step=self.prefill_step, prompt_cache=prompt_cache,
                kv_cache_limit=self.kv_cache_limit, logits_processors=processors, **options,
            )
            try:
                for step in steps:
                    job.put("step", step)
                    if self._stop_after(job, step):
                        outcome = "cancelled"
                        break
            finally:
                steps.close()
        except (KVCacheLimitError, PromptCacheError) as err:
            outcome = "failed"
            job.put("error", APIError(400, str(err), code="context_length_exceeded"))
        except Exception as err:  # noqa: BLE001 - one bad generation must not stop the server
            outcome = "failed"
            job.put("error", APIError(500, f"generation failed: {type(err).__name__}: {err}"))
        finally:
            self._trim_prompt_caches()
            self.active = False
            self._current = None
            self._finish(job, outcome)

    def _finish(self, job, outcome):
        with self._lock:
            self.pending -= 1
            self.counts[outcome] += 1
        job.put("end")

    # -- request side (event loop) -------------------------------------------------

    async def stream(self, prompt, prompt_ids, sampling, log, partition=None):
        """Steps of one generation; closing the iterator early cancels it. Prompt-cache
        snapshots are reused only within ``partition``."""
        with self._lock:
            if self.pending >= self.max_queue:
                raise APIError(503, f"the server is busy ({self.pending} requests waiting); retry later")
            self.pending += 1
        job = Job(prompt, prompt_ids, sampling, asyncio.get_running_loop(), partition=partition)
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

        return {
            "loaded": self._ready.is_set() and self._load_error is None,
            "active": self.active,
            "pending": self.pending,
            **self.counts,
            "prompt_cache_snapshots": sum(len(c) for c in list(self._prompt_caches.values())),
            "max_kv_tokens": self.kv_tokens,
            "memory": {"active_bytes": mx.get_active_memory(), "rss_bytes": _rss_bytes()},
        }


def _rss_bytes():
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
