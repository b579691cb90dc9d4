"""Text generation: chunked prefill, sampling, streaming, prompt caches, memory guard.

``stream_generate`` yields one ``GenerationStep`` per sampled token; ``generate``
collects them. A ``PromptCache`` carries decoding state across calls: the V4 cache
cannot be rewound (its compressors fold tokens into pooled entries), so the prompt
cache keeps immutable snapshots of the model cache taken at known token prefixes and
restores the longest one the next prompt extends. ``save_prompt_cache`` /
``load_prompt_cache`` persist those snapshots to a safetensors file.
"""

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .memory import kv_bytes
from .mlx_lm_import import import_mlx_lm
from .sizes import format_bytes

_sample_utils = import_mlx_lm("sample_utils")
make_logits_processors, make_sampler = _sample_utils.make_logits_processors, _sample_utils.make_sampler

PROMPT_CACHE_FORMAT = "mlx-dsv4-prompt-cache/1"


class PromptCacheError(ValueError):
    """A prompt cache does not belong to this model or does not fit this prompt."""


class KVCacheLimitError(ValueError):
    """The conversation would need more cache memory than the configured limit."""

    def __init__(self, message, *, tokens_that_fit, tokens_needed):
        super().__init__(message)
        self.tokens_that_fit = tokens_that_fit
        self.tokens_needed = tokens_needed


@dataclass
class GenerationStep:
    text: str  # new text since the previous step (never part of a UTF-8 character)
    token: Optional[int]  # the sampled id; None on a final "interrupted" step that sampled nothing
    logprob: Optional[float]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens restored from the prompt cache instead of prefilled
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: int
    cache_bytes: int
    finish_reason: Optional[str] = None  # None until the last step: "stop" | "length" | "interrupted"


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]  # every sampled id, including a final EOS
    finish_reason: str
    stats: dict = field(default_factory=dict)
    logprobs: List[float] = field(default_factory=list)


# -- model identity and memory estimates ---------------------------------------------


def model_fingerprint(model) -> str:
    """Hash of the architecture, the tensor layout and the (small, always float) norm weights."""
    cached = getattr(model, "_dsv4_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    args = model.args
    h.update(json.dumps(getattr(args, "__dict__", str(args)), sort_keys=True, default=str).encode())
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        # names, shapes and dtypes tell quantisations apart; norm weights tell checkpoints apart
        h.update(f"{name}:{value.shape}:{value.dtype};".encode())
        if name.endswith("norm.weight"):
            h.update(memoryview(value.astype(mx.float32)))
    fingerprint = h.hexdigest()[:32]
    try:
        object.__setattr__(model, "_dsv4_fingerprint", fingerprint)
    except AttributeError:
        pass
    return fingerprint


def estimate_cache_bytes(model, n_tokens: int) -> int:
    """Bytes the decoding cache (`model.make_cache()` defaults) holds after `n_tokens` tokens: exact."""
    return kv_bytes(model.args, n_tokens, dtype=model.dtype)


def tokens_that_fit(model, limit_bytes: int) -> int:
    """The longest sequence whose cache stays within `limit_bytes`."""
    if estimate_cache_bytes(model, 1) > limit_bytes:
        return 0
    low, high = 1, 1
    while estimate_cache_bytes(model, high) <= limit_bytes:
        low, high = high, high * 2
        if high > 1 << 40:
            return high
    while high - low > 1:  # the size only grows with the token count
        mid = (low + high) // 2
        if estimate_cache_bytes(model, mid) <= limit_bytes:
            low = mid
        else:
            high = mid
    return low


def check_kv_limit(model, n_prompt: int, max_tokens: int, limit_bytes: int) -> None:
    """Raise ``KVCacheLimitError`` when prompt + max_tokens would not fit in ``limit_bytes``."""
    needed = n_prompt + max_tokens
    fit = tokens_that_fit(model, limit_bytes)
    if needed <= fit:
        return
    room = max(fit - n_prompt, 0)
    raise KVCacheLimitError(
        f"the KV cache for {n_prompt} prompt + {max_tokens} new tokens needs about "
        f"{format_bytes(estimate_cache_bytes(model, needed))}, over the limit of {format_bytes(limit_bytes)}: "
        f"{fit} tokens fit"
        + (f", so at most {room} new tokens after this prompt" if room else ", fewer than this prompt alone"),
        tokens_that_fit=fit,
        tokens_needed=needed,
    )


# -- prompt cache -------------------------------------------------------------------


@dataclass
class _Snapshot:
    tokens: List[int]
    arrays: dict
    meta: dict
    last_used: int = 0


class PromptCache:
    """Decoding state reusable across calls: snapshots of the model cache at token prefixes.

    ``stream_generate(..., prompt_cache=pc)`` restores the longest snapshot whose tokens
    start the new prompt and prefills only the rest; it adds snapshots at the end of the
    prompt's prefill (before its last token) and at the end of generation. With
    ``strict=True`` (caches loaded from a file) a prompt that extends none of the
    snapshots is rejected instead of recomputed.
    """

    def __init__(self, model=None, *, max_snapshots: int = 4, strict: bool = False):
        self.fingerprint = model_fingerprint(model) if model is not None else None
        self.max_snapshots = max_snapshots
        self.strict = strict
        self.snapshots: List[_Snapshot] = []
        self.metadata: dict = {}  # free-form JSON-able data saved with the cache
        self._clock = 0

    def __len__(self):
        return len(self.snapshots)

    @property
    def tokens(self) -> List[int]:
        """The token history of the most recent snapshot."""
        if not self.snapshots:
            return []
        return list(max(self.snapshots, key=lambda s: s.last_used).tokens)

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for s in self.snapshots:
            for a in s.arrays.values():
                if id(a) not in seen:
                    seen.add(id(a))
                    total += a.nbytes
        return total

    def clear(self):
        self.snapshots = []

    def check_model(self, model):
        fingerprint = model_fingerprint(model)
        if self.fingerprint is None:
            self.fingerprint = fingerprint
        elif self.fingerprint != fingerprint:
            raise PromptCacheError(
                f"this prompt cache was made with a different model (fingerprint {self.fingerprint}, "
                f"this model is {fingerprint}); delete it or use the model it was made with"
            )

    def match(self, ids: Sequence[int]) -> Optional[_Snapshot]:
        """The longest snapshot whose tokens are a proper prefix of ``ids``."""
        best = None
        for s in self.snapshots:
            n = len(s.tokens)
            if n < len(ids) and (best is None or n > len(best.tokens)) and list(ids[:n]) == s.tokens:
                best = s
        if best is None and self.strict and self.snapshots:
            raise PromptCacheError(self._mismatch_message(ids))
        return best

    def _mismatch_message(self, ids):
        closest = max(self.snapshots, key=lambda s: _common_prefix(s.tokens, ids))
        common = _common_prefix(closest.tokens, ids)
        if common == len(closest.tokens):
            return (f"the prompt ({len(ids)} tokens) must be longer than the cached prefix "
                    f"({len(closest.tokens)} tokens) to reuse this prompt cache")
        return (f"the prompt does not extend the cached prefix: it differs at token {common} "
                f"(cached prefix {len(closest.tokens)} tokens, prompt {len(ids)} tokens); "
                "use the same system prompt / document, or start a new cache")

    def restore(self, snapshot: _Snapshot, model):
        cache = model.make_cache()
        try:
            cache.load_state(dict(snapshot.arrays), dict(snapshot.meta))
        except (ValueError, KeyError) as e:
            raise PromptCacheError(f"prompt cache does not fit this model: {e}") from None
        self._clock += 1
        snapshot.last_used = self._clock
        return cache

    def add(self, tokens: Sequence[int], cache) -> None:
        tokens = list(tokens)
        arrays, meta = cache.to_state()
        self._clock += 1
        self.snapshots = [s for s in self.snapshots if s.tokens != tokens]
        self.snapshots.append(_Snapshot(tokens, arrays, dict(meta), self._clock))
        if len(self.snapshots) > self.max_snapshots:
            self.snapshots.remove(min(self.snapshots, key=lambda s: s.last_used))

    def encode(self, text: str, tokenizer) -> List[int]:
        """Token ids for ``text``, keeping the cached ids of the longest snapshot whose
        decoded text starts ``text`` (the model's own tokens for what it generated)."""
        for s in sorted(self.snapshots, key=lambda s: -len(s.tokens)):
            prefix = tokenizer.decode(s.tokens)
            if len(prefix) < len(text) and text.startswith(prefix):
                return list(s.tokens) + tokenizer.encode(text[len(prefix):], add_special_tokens=False)
        return tokenizer.encode(text, add_special_tokens=False)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def save_prompt_cache(path, prompt_cache: PromptCache, metadata: Optional[dict] = None) -> None:
    """Write the snapshots of ``prompt_cache`` (arrays, token prefixes, model fingerprint)."""
    if not prompt_cache.snapshots:
        raise PromptCacheError("the prompt cache is empty: nothing to save")
    arrays, index = {}, []
    for i, s in enumerate(prompt_cache.snapshots):
        for name, value in s.arrays.items():
            arrays[f"{i}.{name}"] = value
        arrays[f"{i}.__tokens__"] = mx.array(s.tokens if s.tokens else [0], dtype=mx.int32)
        index.append({"n_tokens": len(s.tokens), "meta": s.meta})
    extra = dict(prompt_cache.metadata)
    if metadata:
        extra.update(metadata)
    header = {
        "format": PROMPT_CACHE_FORMAT,
        "fingerprint": prompt_cache.fingerprint or "",
        "snapshots": json.dumps(index),
        "metadata": json.dumps(extra),
    }
    path = str(path)
    if not path.endswith(".safetensors"):
        # mx.save_safetensors appends the suffix; write to the exact name asked for.
        tmp = path + ".tmp.safetensors"
        mx.save_safetensors(tmp, arrays, metadata=header)
        Path(tmp).replace(path)
    else:
        mx.save_safetensors(path, arrays, metadata=header)


def load_prompt_cache(path, model, *, strict: bool = True, max_snapshots: int = 4) -> PromptCache:
    """Read a file written by ``save_prompt_cache`` for ``model``.

    Raises ``PromptCacheError`` when the file is not a prompt cache or was made with a
    different model. The returned cache is ``strict``: a prompt that does not extend one
    of its prefixes is rejected when it is used.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptCacheError(f"{path}: no such prompt cache file")
    try:
        arrays, header = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:
        raise PromptCacheError(f"{path}: not a readable safetensors file ({e})") from None
    if header.get("format") != PROMPT_CACHE_FORMAT:
        raise PromptCacheError(f"{path}: not an mlx-dsv4 prompt cache (format {header.get('format')!r})")
    pc = PromptCache(max_snapshots=max(max_snapshots, 1), strict=strict)
    pc.fingerprint = header.get("fingerprint") or None
    pc.check_model(model)
    pc.metadata = json.loads(header.get("metadata", "{}"))
    index = json.loads(header["snapshots"])
    pc.max_snapshots = max(pc.max_snapshots, len(index))
    for i, entry in enumerate(index):
        prefix = f"{i}."
        own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        tokens = own.pop("__tokens__").tolist()[: entry["n_tokens"]]
        snapshot = _Snapshot(tokens, own, entry["meta"], i)
        pc.restore(snapshot, model)  # validates the layer schedule now rather than at first use
        pc.snapshots.append(snapshot)
    return pc


# -- generation ---------------------------------------------------------------------


class _TextStream:
    """Detokenised text with stop strings held back until they are decided."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.detok = tokenizer.new_detokenizer() if hasattr(tokenizer, "new_detokenizer") else tokenizer.detokenizer
        self.detok.reset()
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.emitted = 0

    def add(self, token: int):
        """(new text, hit a stop string)."""
        self.detok.add_token(token)
        return self._advance(self.detok.last_segment)

    def _advance(self, segment):
        start = max(0, len(self.text) - self.longest + 1)
        self.text += segment
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                out = self.text[self.emitted:end] if end > self.emitted else ""
                self.text = self.text[:end]
                self.emitted = len(self.text)
                return out, True
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                    if self.text.endswith(s[:k]):
                        hold = k
                        break
            end = len(self.text) - hold
        else:
            end = len(self.text)
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out, False

    def flush(self):
        self.detok.finalize()
        out, hit = self._advance(self.detok.last_segment)
        if not hit:
            out += self.text[self.emitted:]
            self.emitted = len(self.text)
        return out


def _prompt_ids(tokenizer, prompt) -> List[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=False)
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    return [int(t) for t in prompt]


def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)


def drop_oldest_turns(messages: list) -> Optional[list]:
    """``messages`` without their oldest turn (a user message and what answers it), keeping
    leading system/developer messages; None when only the last user turn is left."""
    head = 0
    while head < len(messages) and messages[head].get("role") in ("system", "developer"):
        head += 1
    users = [i for i in range(head, len(messages)) if messages[i].get("role") == "user"]
    if len(users) < 2:
        return None
    return messages[:head] + messages[users[1]:]


def fit_messages(model, tokenizer, messages, *, max_tokens, kv_cache_limit, on_overflow="error",
                 prompt_cache=None, **chat_options):
    """Encode ``messages`` (``mlx_dsv4.chat.encode_messages`` options in ``chat_options``)
    into ids that fit ``kv_cache_limit``; returns (messages kept, ids)."""
    from .chat import encode_messages

    while True:
        text = encode_messages(messages, **chat_options)
        ids = prompt_cache.encode(text, tokenizer) if prompt_cache is not None else tokenizer.encode(text)
        if kv_cache_limit is None:
            return messages, ids
        try:
            check_kv_limit(model, len(ids), max_tokens, kv_cache_limit)
            return messages, ids
        except KVCacheLimitError:
            shorter = drop_oldest_turns(messages) if on_overflow == "drop_oldest" else None
            if shorter is None:
                raise
            messages = shorter


def _chunks(start: int, end: int, step: int, marks: Iterable[int]):
    bounds = set(range(start + step, end, step)) | {m for m in marks if start < m < end} | {end}
    previous = start
    for b in sorted(bounds):
        if b > previous:
            yield previous, b
            previous = b


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int], list],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    eos_token_ids: Optional[Iterable[int]] = None,
    prefill_step: int = 2048,
    prompt_cache: Optional[PromptCache] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    logits_processors: Optional[List[Callable]] = None,
    sampler: Optional[Callable] = None,
    kv_cache_limit: Optional[int] = None,
    on_overflow: str = "error",
    snapshot_at: Iterable[int] = (),
    chat_options: Optional[dict] = None,
) -> Iterator[GenerationStep]:
    """Generate from ``prompt`` one token at a time.

    ``prompt``: text (tokenised as is, no BOS added; with a ``prompt_cache`` the part
    that repeats the cached history keeps the cached ids, see ``PromptCache.encode``),
    token ids, or a list of chat messages (encoded with
    ``mlx_dsv4.chat.encode_messages(**chat_options)``). A caller that closes the
    generator early still leaves the tokens decoded so far in ``prompt_cache``.
    Stops at an EOS id (``eos_token_ids``, default the tokenizer's), at the first stop
    string (not included in the text), after ``max_tokens``, or on KeyboardInterrupt
    (finish_reason "interrupted", the partial output kept). ``progress(done, total)``
    is called after each prefill chunk. ``kv_cache_limit`` (bytes) refuses prompts whose
    cache would not fit (``KVCacheLimitError``); with ``on_overflow="drop_oldest"`` a
    message-list prompt loses its oldest turns until it fits. ``snapshot_at`` lists
    extra prompt lengths at which ``prompt_cache`` keeps a snapshot (e.g. the end of
    the system prompt).
    """
    if on_overflow not in ("error", "drop_oldest"):
        raise ValueError(f"on_overflow must be 'error' or 'drop_oldest', got {on_overflow!r}")
    if prompt_cache is not None:
        prompt_cache.check_model(model)
    if _is_messages(prompt):
        _, ids = fit_messages(model, tokenizer, list(prompt), max_tokens=max_tokens,
                              kv_cache_limit=kv_cache_limit, on_overflow=on_overflow,
                              prompt_cache=prompt_cache, **(chat_options or {}))
    else:
        if isinstance(prompt, str) and prompt_cache is not None:
            ids = prompt_cache.encode(prompt, tokenizer)
        else:
            ids = _prompt_ids(tokenizer, prompt)
        if kv_cache_limit is not None:
            check_kv_limit(model, len(ids), max_tokens, kv_cache_limit)
    if not ids:
        raise ValueError("the prompt is empty")
    if prefill_step < 1:
        raise ValueError("prefill_step must be positive")
    snapshot_at = set(snapshot_at)

    if seed is not None:
        mx.random.seed(seed)
    if sampler is None:
        sampler = make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = list(logits_processors or [])
    processors += make_logits_processors(repetition_penalty=repetition_penalty,
                                         repetition_context_size=repetition_context_size)
    eos = set(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
    text = _TextStream(tokenizer, stop)

    n_prompt = len(ids)
    fed: List[int] = []  # tokens whose forward pass is in the cache
    consistent = True  # the cache holds exactly `fed` (False while a forward is being built)
    cached = 0
    generated: List[int] = []
    history = mx.array(ids, dtype=mx.int32) if processors else None
    prompt_tps = 0.0
    t_start = time.perf_counter()
    t_first = None
    mx.reset_peak_memory()

    def step_out(text_piece, token, logprob, reason=None):
        now = time.perf_counter()
        decode_time = now - t_first if t_first is not None else 0.0
        n_gen = len(generated)
        return GenerationStep(
            text=text_piece,
            token=token,
            logprob=logprob,
            prompt_tokens=n_prompt,
            cached_tokens=cached,
            prompt_tps=prompt_tps,
            generation_tokens=n_gen,
            generation_tps=(n_gen - 1) / decode_time if n_gen > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory(),
            cache_bytes=cache.nbytes,
            finish_reason=reason,
        )

    def forward(tokens: List[int]):
        nonlocal consistent, history
        consistent = False
        logits = model(mx.array([tokens], dtype=mx.int32), cache=cache)[:, -1, :]
        fed.extend(tokens)
        consistent = True
        if processors:
            for p in processors:
                logits = p(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        token = token.reshape(-1)
        return token, logprobs[0, token[0]]

    cache = None
    pending = None  # a sampled (token, logprob, text) not yet handed out
    try:
        snapshot = prompt_cache.match(ids) if prompt_cache is not None else None
        if snapshot is not None:
            cache = prompt_cache.restore(snapshot, model)
            cached = len(snapshot.tokens)
            fed = list(snapshot.tokens)
        else:
            cache = model.make_cache()
        # Prefill all but the last prompt token; the last one's logits give the first sample.
        todo = n_prompt - 1 - cached
        for a, b in _chunks(cached, n_prompt - 1, prefill_step, snapshot_at):
            consistent = False
            model(mx.array([ids[a:b]], dtype=mx.int32), cache=cache)
            fed.extend(ids[a:b])
            consistent = True
            mx.eval(cache.state())
            mx.clear_cache()
            if prompt_cache is not None and b in snapshot_at:
                prompt_cache.add(fed, cache)
            if progress is not None:
                progress(b - cached, todo)
        if prompt_cache is not None and n_prompt > 1 and cached < n_prompt - 1:
            prompt_cache.add(fed, cache)

        y, logprob = forward(ids[-1:])
        mx.async_eval(y, logprob)
        while True:
            token = int(y.item())
            lp = float(logprob.item())
            generated.append(token)
            pending = (token, lp, "")
            if t_first is None:
                t_first = time.perf_counter()
                prompt_tps = (n_prompt - cached) / (t_first - t_start)
            if processors:
                history = mx.concatenate([history, y.astype(mx.int32)])
            if token in eos:
                reason, piece = "stop", ""
            else:
                piece, hit = text.add(token)
                pending = (token, lp, piece)
                reason = "stop" if hit else ("length" if len(generated) >= max_tokens else None)
                if reason is None:
                    # Queue the next forward pass before handing this token out, so the
                    # device works while the caller prints.
                    y, logprob = forward([token])
                    mx.async_eval(y, logprob)
            if reason is None:
                try:
                    yield step_out(piece, token, lp)
                except GeneratorExit:
                    # The caller stopped early (a tool call, a cancelled request): keep what
                    # the cache holds for the next turn.
                    if prompt_cache is not None and consistent:
                        prompt_cache.add(fed, cache)
                    raise
                pending = None
                continue
            if prompt_cache is not None:
                # Leave every sampled token in the cache, so the next turn only adds its own.
                if len(fed) < n_prompt + len(generated):
                    consistent = False
                    model(mx.array([[token]], dtype=mx.int32), cache=cache)
                    fed.append(token)
                    consistent = True
                mx.eval(cache.state())
                prompt_cache.add(fed, cache)
            if reason != "stop" or token in eos:
                piece += text.flush()
            pending = None
            yield step_out(piece, token, lp, reason)
            break
    except KeyboardInterrupt:
        if cache is None:
            cache = model.make_cache()
        elif prompt_cache is not None and consistent and len(fed) > cached:
            prompt_cache.add(fed, cache)
        token, lp, piece = pending if pending is not None else (None, None, "")
        yield step_out(piece + text.flush(), token, lp, "interrupted")


def generate(model, tokenizer, prompt, **kwargs) -> GenerationResult:
    """``stream_generate`` run to the end; the result holds the text, ids and final stats."""
    pieces, tokens, logprobs = [], [], []
    last = None
    for step in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(step.text)
        if step.token is not None:
            tokens.append(step.token)
            logprobs.append(step.logprob)
        last = step
    stats = {
        "prompt_tokens": last.prompt_tokens,
        "cached_tokens": last.cached_tokens,
        "prompt_tps": last.prompt_tps,
        "generation_tokens": last.generation_tokens,
        "generation_tps": last.generation_tps,
        "peak_memory": last.peak_memory,
        "cache_bytes": last.cache_bytes,
    }
    return GenerationResult("".join(pieces), tokens, last.finish_reason, stats, logprobs)
