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
import math
import numbers
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .device_memory import wired_limit
from .memory import PREFILL_CHUNK, kv_bytes, run_bytes
from .mlx_lm_import import import_mlx_lm
from .sizes import format_bytes
from .speculative import DRAFTING, MAX_DRAFT, DraftSwitch, sampling_distribution
from .streams import parallel_streams

_sample_utils = import_mlx_lm("sample_utils")
make_logits_processors, make_sampler = _sample_utils.make_logits_processors, _sample_utils.make_sampler

_PROMPT_CACHE_FAMILY = "mlx-dsv4-prompt-cache/"
PROMPT_CACHE_FORMAT = _PROMPT_CACHE_FAMILY + "2"  # 2: a checksum of the arrays


class PromptCacheError(ValueError):
    """A prompt cache (or its file) does not belong to this model, does not fit this prompt, or
    cannot be read or written."""


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
    draft_proposed: int = 0  # with speculative decoding: tokens the drafter proposed so far
    draft_accepted: int = 0  # of those, the ones the model accepted


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
    kv_dtype, index_dtype = getattr(model, "cache_dtypes", ("fp8", "fp4"))
    return kv_bytes(model.args, n_tokens, kv_dtype=kv_dtype, index_dtype=index_dtype, dtype=model.dtype)


def estimate_run_bytes(model, n_tokens: int, prefill_step: int = PREFILL_CHUNK) -> int:
    """Bytes beyond the weights that running `n_tokens` tokens peaks at: the cache (as
    `estimate_cache_bytes`) plus the transient of the prefill chunk ending there."""
    kv_dtype, index_dtype = getattr(model, "cache_dtypes", ("fp8", "fp4"))
    return run_bytes(model.args, n_tokens, 0, prefill_step, kv_dtype=kv_dtype, index_dtype=index_dtype,
                     dtype=model.dtype, streams=len(parallel_streams()))


def tokens_that_fit(model, limit_bytes: int, prefill_step: int = PREFILL_CHUNK) -> int:
    """The longest sequence whose cache plus prefill transient stays within `limit_bytes`."""
    def fits(n):
        return estimate_run_bytes(model, n, prefill_step) <= limit_bytes

    if not fits(1):
        return 0
    low, high = 1, 1
    while fits(high):
        low, high = high, high * 2
        if high > 1 << 40:
            return high
    while high - low > 1:  # the size only grows with the token count
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def check_kv_limit(model, n_prompt: int, max_tokens: int, limit_bytes: int, prefill_step: int = PREFILL_CHUNK) -> None:
    """Raise ``KVCacheLimitError`` when the cache for prompt + max_tokens plus the prefill
    transient (`estimate_run_bytes`) would not fit in ``limit_bytes``."""
    needed = n_prompt + max_tokens
    fit = tokens_that_fit(model, limit_bytes, prefill_step)
    if needed <= fit:
        return
    room = max(fit - n_prompt, 0)
    cache = estimate_cache_bytes(model, needed)
    transient = estimate_run_bytes(model, needed, prefill_step) - cache
    raise KVCacheLimitError(
        f"the KV cache for {n_prompt} prompt + {max_tokens} new tokens needs about {format_bytes(cache)} "
        f"and prefilling it in {prefill_step}-token chunks about {format_bytes(transient)} more, "
        f"over the limit of {format_bytes(limit_bytes)}: "
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
    # with speculative decoding: the drafter's side, {"drafter": its name, "fingerprint",
    # "arrays", "meta"} (Drafting.drafter_state), so that a drafted generation resumes here
    draft: Optional[dict] = None


def snapshot_bytes(snapshot: _Snapshot) -> int:
    draft = snapshot.draft["arrays"].values() if snapshot.draft else ()
    return sum(a.nbytes for a in snapshot.arrays.values()) + sum(a.nbytes for a in draft)


def restore_snapshot(snapshot: _Snapshot, model):
    """A fresh cache of ``model`` holding ``snapshot``'s state."""
    cache = model.make_cache()
    try:
        cache.load_state(dict(snapshot.arrays), dict(snapshot.meta))
    except (ValueError, KeyError) as e:
        raise PromptCacheError(f"prompt cache does not fit this model: {e}") from None
    return cache


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
            for a in [*s.arrays.values(), *(s.draft["arrays"].values() if s.draft else ())]:
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
            raise PromptCacheError(_different_model(self.fingerprint, fingerprint))

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
        cache = restore_snapshot(snapshot, model)
        self._clock += 1
        snapshot.last_used = self._clock
        return cache

    def add(self, tokens: Sequence[int], cache, draft: Optional[dict] = None) -> None:
        """Keep the state of ``cache`` after ``tokens`` (and ``draft``, the drafter's side)."""
        tokens = list(tokens)
        arrays, meta = cache.to_state()
        self._clock += 1
        self.snapshots = [s for s in self.snapshots if s.tokens != tokens]
        self.snapshots.append(_Snapshot(tokens, arrays, dict(meta), self._clock, draft))
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


def _different_model(cached: str, model: str) -> str:
    return (f"this prompt cache was made with a different model (fingerprint {cached}, "
            f"this model is {model}); delete it or use the model it was made with")


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _arrays_checksum(arrays: dict) -> str:
    """SHA-256 of every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = arrays[name]
        dtype = str(value.dtype).rsplit(".", 1)[-1]
        h.update(f"{name}:{dtype}:{tuple(value.shape)};".encode())
        view = memoryview(value)
        h.update(view if view.c_contiguous else view.tobytes())
    return "sha256:" + h.hexdigest()


def _activation_dtype(model):
    """The dtype of the hidden states the model's compressors see (a quantised embedding gives
    that of its scales); None when the model has no embedding to ask."""
    embed = getattr(model, "embed", None)
    return embed(mx.zeros((1, 1), dtype=mx.int32)).dtype if embed is not None else None


def save_prompt_cache(path, prompt_cache: PromptCache, metadata: Optional[dict] = None) -> None:
    """Write the snapshots of ``prompt_cache`` (arrays, token prefixes, model fingerprint,
    checksum) to ``path``, replacing it only once the whole file is written.

    Raises ``PromptCacheError`` naming the file when it cannot be written."""
    if not prompt_cache.snapshots:
        raise PromptCacheError("the prompt cache is empty: nothing to save")
    if not prompt_cache.fingerprint:
        raise PromptCacheError("the prompt cache has no model fingerprint: it was never used with a model")
    arrays, index = {}, []
    for i, s in enumerate(prompt_cache.snapshots):
        for name, value in s.arrays.items():
            arrays[f"{i}.{name}"] = value
        arrays[f"{i}.__tokens__"] = mx.array(s.tokens if s.tokens else [0], dtype=mx.int32)
        entry = {"n_tokens": len(s.tokens), "meta": s.meta}
        if s.draft:
            for name, value in s.draft["arrays"].items():
                arrays[f"{i}.draft.{name}"] = value
            entry["draft"] = {key: s.draft[key] for key in ("drafter", "fingerprint", "meta")}
        index.append(entry)
    extra = dict(prompt_cache.metadata)
    if metadata:
        extra.update(metadata)
    header = {
        "format": PROMPT_CACHE_FORMAT,
        "fingerprint": prompt_cache.fingerprint,
        "checksum": _arrays_checksum(arrays),
        "snapshots": json.dumps(index),
        "metadata": json.dumps(extra),
    }
    path = Path(path)
    # Written next to the target, so that the final rename cannot cross file systems.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            mx.save_safetensors(f, arrays, metadata=header)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, FileNotFoundError) and not path.parent.is_dir():
            reason = f"the folder {path.parent} does not exist"
        else:
            reason = getattr(e, "strerror", None) or str(e)
        raise PromptCacheError(f"{path}: cannot write the prompt cache: {reason}") from None


def _json_field(header: dict, name: str, kind: type):
    text = header.get(name)
    if text is None:
        raise PromptCacheError(f"the header has no {name!r} field")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise PromptCacheError(f"the header field {name!r} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise PromptCacheError(f"the header field {name!r} must hold a JSON {'list' if kind is list else 'object'}, "
                               f"got {type(value).__name__}")
    return value


def _read_snapshots(arrays: dict, index: list, model) -> List[_Snapshot]:
    """The snapshots of a prompt-cache file, each checked against the cache ``model`` makes."""
    if not index:
        raise PromptCacheError("the file holds no snapshots")
    groups = [{} for _ in index]
    for name, value in arrays.items():
        number, dot, rest = name.partition(".")
        if not (dot and number.isdigit() and number == str(int(number)) and int(number) < len(index)):
            raise PromptCacheError(f"unexpected array {name!r}: the header lists {len(index)} snapshot(s)")
        groups[int(number)][rest] = value
    vocab_size = getattr(getattr(model, "args", None), "vocab_size", None)
    activation_dtype = _activation_dtype(model)
    snapshots = []
    for i, (entry, own) in enumerate(zip(index, groups)):
        where = f"snapshot {i}"
        if not isinstance(entry, dict) or set(entry) - {"draft"} != {"n_tokens", "meta"}:
            raise PromptCacheError(f"{where}: expected an object with the fields n_tokens and meta (and draft), "
                                   f"got {entry!r:.200}")
        n_tokens = entry["n_tokens"]
        if not _is_integer(n_tokens) or n_tokens < 0:
            raise PromptCacheError(f"{where}: n_tokens must be a token count, got {n_tokens!r}")
        tokens = own.pop("__tokens__", None)
        draft_arrays = {name[len("draft."):]: own.pop(name) for name in [n for n in own if n.startswith("draft.")]}
        if tokens is None:
            raise PromptCacheError(f"{where}: array {i}.__tokens__ is missing")
        if tokens.dtype != mx.int32 or tuple(tokens.shape) != (max(n_tokens, 1),):
            raise PromptCacheError(f"{where}: array {i}.__tokens__ has shape {tuple(tokens.shape)} and dtype "
                                   f"{tokens.dtype}, expected ({max(n_tokens, 1)},) and int32 for {n_tokens} tokens")
        tokens = tokens.tolist()[:n_tokens]
        if vocab_size and any(not 0 <= t < vocab_size for t in tokens):
            bad = next(t for t in tokens if not 0 <= t < vocab_size)
            raise PromptCacheError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")
        try:
            offset = model.make_cache().check_state(own, entry["meta"], batch=1, activation_dtype=activation_dtype)
        except ValueError as e:
            raise PromptCacheError(f"{where}: {e}") from None
        if offset != n_tokens:
            raise PromptCacheError(f"{where}: the cache holds {offset} tokens but n_tokens is {n_tokens}")
        draft = _read_drafter_state(where, entry.get("draft"), draft_arrays, model, n_tokens, activation_dtype)
        snapshots.append(_Snapshot(tokens, own, dict(entry["meta"]), i, draft))
    return snapshots


def _read_drafter_state(where, entry, arrays, model, n_tokens, activation_dtype) -> Optional[dict]:
    """The drafter's side of a snapshot read from a file, checked against the drafter ``model``
    has loaded; None when the file has none or ``model`` has not that drafter (or another one)."""
    if entry is None:
        if arrays:
            raise PromptCacheError(f"{where}: unexpected array 'draft.{sorted(arrays)[0]}': the header lists no "
                                   "drafter state for this snapshot")
        return None
    if (not isinstance(entry, dict) or set(entry) != {"drafter", "fingerprint", "meta"}
            or not all(isinstance(entry[k], str) for k in ("drafter", "fingerprint"))
            or not isinstance(entry["meta"], dict)):
        raise PromptCacheError(f"{where}: draft: expected an object with the text fields drafter and fingerprint "
                               f"and the object meta, got {entry!r:.200}")
    where = f"{where}: drafter {entry['drafter']!r}"
    if entry["drafter"] not in DRAFTERS or entry["drafter"] == "none":
        raise PromptCacheError(f"{where}: not a drafter (the drafters are {', '.join(DRAFTERS[1:])})")
    drafter = _drafter(model, entry["drafter"])
    if drafter is None or model_fingerprint(drafter) != entry["fingerprint"]:
        return None  # not the drafter this model drafts with: its generations re-run the prefix
    cache_arrays = {name[len("cache."):]: value for name, value in arrays.items() if name.startswith("cache.")}
    others = sorted(name for name in arrays if not name.startswith("cache.") and name != "last_hidden")
    if others:
        raise PromptCacheError(f"{where}: unexpected array 'draft.{others[0]}'")
    try:
        template = drafter.make_cache(*getattr(model, "cache_dtypes", ("fp8", "fp4")), dtype=model.dtype)
        offset = template.check_state(cache_arrays, entry["meta"], batch=1, activation_dtype=activation_dtype)
    except ValueError as e:
        raise PromptCacheError(f"{where}: {e}") from None
    lag = DRAFTING[entry["drafter"]].cache_lag
    expected = max(n_tokens - lag, 0)
    if offset != expected:
        raise PromptCacheError(f"{where}: its cache holds {offset} tokens, expected {expected} "
                               f"for a snapshot of {n_tokens} tokens")
    if lag:
        hidden = arrays.get("last_hidden")
        shape = (1, 1, model.args.hc_mult, model.args.hidden_size)
        if hidden is None:
            raise PromptCacheError(f"{where}: array 'draft.last_hidden' is missing")
        if tuple(hidden.shape) != shape or not mx.issubdtype(hidden.dtype, mx.floating):
            raise PromptCacheError(f"{where}: array 'draft.last_hidden' has shape {tuple(hidden.shape)} and dtype "
                                   f"{hidden.dtype}, expected {shape} and a float dtype")
    return {"drafter": entry["drafter"], "fingerprint": entry["fingerprint"], "arrays": dict(arrays),
            "meta": dict(entry["meta"])}


def load_prompt_cache(path, model, *, strict: bool = True, max_snapshots: int = 4) -> PromptCache:
    """Read a file written by ``save_prompt_cache`` for ``model``.

    Raises ``PromptCacheError`` naming the file and the problem when it is not a prompt
    cache, was made with another model or is damaged (its header, or an array that does not
    match the checksum or the shape and dtype ``model``'s cache holds there). The returned
    cache is ``strict``: a prompt that does not extend one of its prefixes is rejected when
    it is used.
    """
    path = Path(path)
    if not path.exists():
        raise PromptCacheError(f"{path}: no such prompt cache file")
    if not path.is_file():
        raise PromptCacheError(f"{path}: not a file")
    try:
        arrays, header = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:
        raise PromptCacheError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        file_format = header.get("format")
        if file_format != PROMPT_CACHE_FORMAT:
            if isinstance(file_format, str) and file_format.startswith(_PROMPT_CACHE_FAMILY):
                raise PromptCacheError(f"written in format {file_format!r}, this version reads "
                                       f"{PROMPT_CACHE_FORMAT!r}; delete it to make a new one")
            raise PromptCacheError(f"not an mlx-dsv4 prompt cache (format {file_format!r})")
        fingerprint, expected = header.get("fingerprint"), model_fingerprint(model)
        if not fingerprint:
            raise PromptCacheError("the file names no model fingerprint, so it cannot be checked against this "
                                   "model; delete it to make a new one")
        if fingerprint != expected:
            raise PromptCacheError(_different_model(fingerprint, expected))
        index = _json_field(header, "snapshots", list)
        metadata = _json_field(header, "metadata", dict)
        checksum = header.get("checksum")
        if not checksum:
            raise PromptCacheError("the header has no 'checksum' field")
        try:
            actual = _arrays_checksum(arrays)
        except (RuntimeError, ValueError) as e:
            raise PromptCacheError(f"cannot read the arrays ({e})") from None
        if actual != checksum:
            raise PromptCacheError("the arrays do not match the checksum in the header: the file is damaged")
        snapshots = _read_snapshots(arrays, index, model)
    except PromptCacheError as e:
        raise PromptCacheError(f"{path}: {e}") from None
    pc = PromptCache(max_snapshots=max(max_snapshots, len(snapshots), 1), strict=strict)
    pc.fingerprint = expected
    pc.metadata = metadata
    pc.snapshots = snapshots
    pc._clock = len(snapshots)
    return pc


# -- generation ---------------------------------------------------------------------

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024  # characters in one stop string


class GenerationParameterError(ValueError):
    """A generation parameter the model or the sampler cannot use; ``field`` names it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    """A real number a float can hold (an integer too large for a float is not)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_stop_strings(stop: Sequence[str]) -> None:
    """Raise ``GenerationParameterError`` unless ``stop`` holds at most ``MAX_STOP_STRINGS``
    strings of at most ``MAX_STOP_LENGTH`` characters each."""
    stop = list(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise GenerationParameterError("stop", f"may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise GenerationParameterError("stop", f"must hold strings, item {i} is {type(s).__name__}")
        if len(s) > MAX_STOP_LENGTH:
            raise GenerationParameterError(
                "stop", f"strings may be at most {MAX_STOP_LENGTH} characters long, item {i} has {len(s)}")


def check_sampling_parameters(model, *, max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                              repetition_penalty=None, repetition_context_size=20, seed=None, stop=(),
                              vocab_size=None) -> None:
    """Raise ``GenerationParameterError`` naming the first parameter ``stream_generate`` cannot use
    with ``model`` (``top_k`` must stay below its vocabulary size). ``model`` may be None when
    ``vocab_size`` is given, e.g. read from the config before the weights are loaded."""
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "args", None), "vocab_size", None)
    top_k_range = f"an integer in [0, {vocab_size})" if vocab_size else "a non-negative integer"
    checks = (
        ("max_tokens", max_tokens, _is_integer(max_tokens) and max_tokens >= 1, "a positive integer"),
        ("temperature", temperature, _is_finite_number(temperature) and temperature >= 0, "a finite number >= 0"),
        ("top_p", top_p, _is_finite_number(top_p) and 0 < top_p <= 1, "a number in (0, 1]"),
        ("top_k", top_k, _is_integer(top_k) and 0 <= top_k and (not vocab_size or top_k < vocab_size),
         f"{top_k_range} (0 turns top-k off)"),
        ("min_p", min_p, _is_finite_number(min_p) and 0 <= min_p <= 1, "a number in [0, 1]"),
        ("repetition_penalty", repetition_penalty,
         repetition_penalty is None or (_is_finite_number(repetition_penalty) and repetition_penalty > 0),
         "None or a finite number > 0"),
        ("repetition_context_size", repetition_context_size,
         _is_integer(repetition_context_size) and repetition_context_size >= 1, "a positive integer"),
        ("seed", seed, seed is None or (_is_integer(seed) and 0 <= seed < 2**64), "None or an integer in [0, 2**64)"),
    )
    for name, value, valid, requirement in checks:
        if not valid:
            raise GenerationParameterError(name, f"must be {requirement}, got {value!r}")
    check_stop_strings(stop)


def _global_random_seed() -> Optional[int]:
    """The seed that recreates MLX's global PRNG key (``mx.random.seed(s)`` makes the key
    ``[s >> 32, s & 0xFFFFFFFF]``), or None when the key can no longer be evaluated."""
    try:
        high, low = mx.random.state[0].tolist()
    except (RuntimeError, ValueError):
        return None
    return (high << 32) | low


def _restore_global_random_seed(seed: Optional[int]) -> None:
    # A compiled sampler that raises while it is being traced leaves a placeholder as the
    # global key, and every later random draw in the process would fail on it.
    if seed is not None:
        mx.random.seed(seed)


class _StopStrings:
    """Aho-Corasick automaton over the stop strings.

    Text goes in one character at a time, at constant amortised cost, so the work per
    token does not depend on how much text came before. ``held`` is the length of the
    longest end of the text so far that begins a stop string: the text to hold back.
    """

    def __init__(self, stops: Sequence[str]):
        self._next = [{}]  # node -> {character: node}; a node is a prefix of a stop string
        self._depth = [0]
        self._fallback = [0]  # node of the longest proper suffix that is a prefix too
        self._match = [0]  # length of the longest stop string ending at the node; 0 for none
        for stop in stops:
            node = 0
            for ch in stop:
                child = self._next[node].get(ch)
                if child is None:
                    child = len(self._next)
                    self._next[node][ch] = child
                    self._next.append({})
                    self._depth.append(self._depth[node] + 1)
                    self._fallback.append(0)
                    self._match.append(0)
                node = child
            self._match[node] = len(stop)
        queue = deque(self._next[0].values())
        while queue:
            node = queue.popleft()
            for ch, child in self._next[node].items():
                fallback = self._fallback[node]
                while fallback and ch not in self._next[fallback]:
                    fallback = self._fallback[fallback]
                self._fallback[child] = self._next[fallback].get(ch, 0)
                self._match[child] = self._match[child] or self._match[self._fallback[child]]
                queue.append(child)
        self._node = 0

    @property
    def held(self) -> int:
        return self._depth[self._node]

    def feed(self, text: str) -> Optional[int]:
        """Where in ``text`` the earliest-starting stop string completed by it begins
        (negative: in the held text before it), or None."""
        following, fallback, match = self._next, self._fallback, self._match
        node, first = self._node, None
        for i, ch in enumerate(text):
            while node and ch not in following[node]:
                node = fallback[node]
            node = following[node].get(ch, 0)
            if match[node] and (first is None or i + 1 - match[node] < first):
                first = i + 1 - match[node]
        self._node = node
        return first


class _TextStream:
    """Detokenised text with stop strings held back until they are decided.

    Only the held-back end of the text is kept: it is shorter than the longest stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.detok = tokenizer.new_detokenizer() if hasattr(tokenizer, "new_detokenizer") else tokenizer.detokenizer
        self.detok.reset()
        stops = [s for s in stop if s]
        self.stops = _StopStrings(stops) if stops else None
        self.held = ""

    def add(self, token: int):
        """(new text, hit a stop string)."""
        self.detok.add_token(token)
        return self._advance(self.detok.last_segment)

    def _advance(self, segment):
        if self.stops is None:
            return segment, False
        text = self.held + segment
        start = self.stops.feed(segment)
        if start is not None:
            self.held = ""
            return text[: len(text) - len(segment) + start], True
        keep = len(text) - self.stops.held
        self.held = text[keep:]
        return text[:keep], False

    def flush(self):
        self.detok.finalize()
        out, hit = self._advance(self.detok.last_segment)
        if not hit:
            out += self.held
            self.held = ""
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
                 prompt_cache=None, prefill_step=PREFILL_CHUNK, **chat_options):
    """Encode ``messages`` (``mlx_dsv4.chat.encode_messages`` options in ``chat_options``)
    into ids that fit ``kv_cache_limit``; returns (messages kept, ids)."""
    from .chat import encode_messages

    while True:
        text = encode_messages(messages, **chat_options)
        ids = prompt_cache.encode(text, tokenizer) if prompt_cache is not None else tokenizer.encode(text)
        if kv_cache_limit is None:
            return messages, ids
        try:
            check_kv_limit(model, len(ids), max_tokens, kv_cache_limit, prefill_step)
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


def _prompt_token_ids(model, tokenizer, prompt, *, max_tokens, kv_cache_limit, on_overflow, prompt_cache,
                      chat_options, prefill_step) -> List[int]:
    """The prompt as token ids (from text, ids or chat messages), checked against ``kv_cache_limit``."""
    if _is_messages(prompt):
        _, ids = fit_messages(model, tokenizer, list(prompt), max_tokens=max_tokens,
                              kv_cache_limit=kv_cache_limit, on_overflow=on_overflow,
                              prompt_cache=prompt_cache, prefill_step=prefill_step, **(chat_options or {}))
    else:
        if isinstance(prompt, str) and prompt_cache is not None:
            ids = prompt_cache.encode(prompt, tokenizer)
        else:
            ids = _prompt_ids(tokenizer, prompt)
        if kv_cache_limit is not None:
            check_kv_limit(model, len(ids), max_tokens, kv_cache_limit, prefill_step)
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


class _Generation:
    """One ``stream_generate`` call: the model cache and the tokens it holds, the sampled
    tokens, and the statistics each step reports."""

    def __init__(self, model, tokenizer, ids, *, sampler, processors, eos, stop, prompt_cache):
        self.model = model
        self.ids = ids
        self.sampler = sampler
        self.processors = processors
        self.eos = eos
        self.text = _TextStream(tokenizer, stop)
        self.prompt_cache = prompt_cache
        self.cache = None
        self.fed: List[int] = []  # tokens whose forward pass is in the cache
        self.consistent = True  # the cache holds exactly `fed` (False while a forward is being built)
        self.cached = 0  # prompt tokens restored from the prompt cache
        self.generated: List[int] = []
        self.history = mx.array(ids, dtype=mx.int32) if processors else None
        self.pending = None  # a sampled (token, logprob, text) not yet handed out
        self.prompt_tps = 0.0
        self.drafting = None  # Drafting with speculative decoding
        self.draft_name = None  # the DRAFTERS name it drafts with
        self.max_tokens = None  # set by open_generation, for callers that drive the decoding
        self.seed_key = None  # with open_generation and a seed: the seed of this generation's PRNG key now
        self.t_start = time.perf_counter()
        self.t_first = None
        mx.reset_peak_memory()

    def step(self, text_piece, token, logprob, reason=None) -> GenerationStep:
        decode_time = time.perf_counter() - self.t_first if self.t_first is not None else 0.0
        n_gen = len(self.generated)
        return GenerationStep(
            text=text_piece,
            token=token,
            logprob=logprob,
            prompt_tokens=len(self.ids),
            cached_tokens=self.cached,
            prompt_tps=self.prompt_tps,
            generation_tokens=n_gen,
            generation_tps=(n_gen - 1) / decode_time if n_gen > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory(),
            cache_bytes=self.cache.nbytes,
            finish_reason=reason,
            draft_proposed=self.drafting.proposed if self.drafting is not None else 0,
            draft_accepted=self.drafting.accepted if self.drafting is not None else 0,
        )

    def _run_model(self, tokens: List[int]):
        self.consistent = False
        logits = self.model(mx.array([tokens], dtype=mx.int32), cache=self.cache)
        self.fed.extend(tokens)
        self.consistent = True
        return logits

    # -- prefill --------------------------------------------------------------------

    def prefill(self, prefill_step: int, snapshot_at: set, progress):
        """Restore the longest cached prefix, then run the rest of the prompt but its last
        token in chunks; the last one's logits give the first sample."""
        ids, prompt_cache = self.ids, self.prompt_cache
        snapshot = prompt_cache.match(ids) if prompt_cache is not None else None
        if snapshot is not None:
            self.cache = prompt_cache.restore(snapshot, self.model)
            self.cached = len(snapshot.tokens)
            self.fed = list(snapshot.tokens)
        else:
            self.cache = self.model.make_cache()
        n_prompt = len(ids)
        todo = n_prompt - 1 - self.cached
        for a, b in _chunks(self.cached, n_prompt - 1, prefill_step, snapshot_at):
            self._run_model(ids[a:b])
            mx.eval(self.cache.state())
            mx.clear_cache()
            if prompt_cache is not None and b in snapshot_at:
                prompt_cache.add(self.fed, self.cache)
            if progress is not None:
                progress(b - self.cached, todo)
        if prompt_cache is not None and n_prompt > 1 and self.cached < n_prompt - 1:
            prompt_cache.add(self.fed, self.cache)

    # -- decoding -------------------------------------------------------------------

    def _sample(self, tokens: List[int]):
        """Run ``tokens``; the next token and its log-probability (not evaluated yet)."""
        return self.pick(self._run_model(tokens)[:, -1, :])

    def pick(self, logits: mx.array):
        """The next token [1] and its log-probability (not evaluated yet) from logits [1, vocab]."""
        for processor in self.processors:
            logits = processor(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = self.sampler(logprobs).reshape(-1)
        return token, logprobs[0, token[0]]

    def take(self, y: mx.array, logprob: mx.array, max_tokens: int):
        """Record the sampled token ``y``: (token, logprob, why generation stops there or None,
        the text it adds)."""
        token = int(y.item())
        lp = float(logprob.item())
        self.generated.append(token)
        self.pending = (token, lp, "")
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.prompt_tps = (len(self.ids) - self.cached) / (self.t_first - self.t_start)
        if self.processors:
            self.history = mx.concatenate([self.history, y.astype(mx.int32)])
        reason, piece = self._stop_reason(token, max_tokens)
        self.pending = (token, lp, piece)
        return token, lp, reason, piece

    def keep_prefix(self) -> None:
        """Leave what the cache holds in the prompt cache (a generation stopped early)."""
        if self.prompt_cache is not None and self.consistent:
            self._add_snapshot()

    def _add_snapshot(self) -> None:
        """Put the cache (with speculative decoding, the drafter's state too) in the prompt cache."""
        draft = None
        if self.drafting is not None:
            arrays, meta = self.drafting.drafter_state()
            draft = {"drafter": self.draft_name, "fingerprint": model_fingerprint(self.drafting.drafter),
                     "arrays": arrays, "meta": meta}
        mx.eval(self.cache.state())
        self.prompt_cache.add(self.fed, self.cache, draft=draft)

    def decode(self, max_tokens: int) -> Iterator[GenerationStep]:
        y, logprob = self._sample(self.ids[-1:])
        mx.async_eval(y, logprob)
        while True:
            token, lp, reason, piece = self.take(y, logprob, max_tokens)
            if reason is not None:
                yield self._finish(token, lp, piece, reason)
                return
            # Queue the next forward pass before handing this token out, so the device
            # works while the caller prints.
            y, logprob = self._sample([token])
            mx.async_eval(y, logprob)
            try:
                yield self.step(piece, token, lp)
            except GeneratorExit:
                # The caller stopped early (a tool call, a cancelled request): keep what
                # the cache holds for the next turn.
                self.keep_prefix()
                raise
            self.pending = None

    def decode_speculative(self, max_tokens: int, num_draft: int, prefill_step: int, progress=None,
                           distribution=None, switch=None, drafter: str = "mtp",
                           snapshot_at: Iterable[int] = ()) -> Iterator[GenerationStep]:
        """Decoding with ``drafter`` (a name of ``DRAFTERS``): greedy (``distribution`` None) gives
        the tokens of plain greedy decoding; sampling from ``distribution`` gives tokens of the
        same distribution as plain sampling. ``switch`` (a ``DraftSwitch``) turns speculation off
        while plain steps are faster. The prompt cache's snapshots carry the drafter's state;
        one without it (made by plain decoding, or by another drafter) is not used: the
        prompt is run from its start."""
        self.draft_name = drafter
        drafter_module = _drafter(self.model, drafter)
        ids, prompt_cache = self.ids, self.prompt_cache
        snapshot = prompt_cache.match(ids) if prompt_cache is not None else None
        if snapshot is not None and not _has_drafter_state(snapshot, drafter, drafter_module):
            snapshot = None
        if snapshot is not None:
            self.cache = prompt_cache.restore(snapshot, self.model)
            self.drafting = _drafting(self.model, self.cache, drafter, drafter_module, distribution)
            try:
                self.drafting.load_drafter_state(snapshot.draft["arrays"], snapshot.draft["meta"], snapshot.tokens)
            except (ValueError, KeyError) as e:
                raise PromptCacheError(f"prompt cache does not fit this drafter: {e}") from None
            self.cached = len(snapshot.tokens)
            self.fed = list(snapshot.tokens)
        else:
            self.cache = self.model.make_cache()
            self.drafting = _drafting(self.model, self.cache, drafter, drafter_module, distribution)
        marks = set(snapshot_at)
        if prompt_cache is not None:
            # as plain decoding does, a snapshot before the prompt's last token: the same prompt
            # again extends it
            marks.add(len(ids) - 1)
        todo = len(ids) - self.cached
        for a, b in _chunks(self.cached, len(ids), prefill_step, marks):
            self.consistent = False
            logits = self.drafting.extend(ids, a, b)
            self.fed = list(ids[:b])
            self.consistent = True
            mx.clear_cache()
            if prompt_cache is not None and b in marks:
                self._add_snapshot()
            if progress is not None:
                progress(b - self.cached, todo)
        logprobs = logits - mx.logsumexp(logits)
        token = self.drafting.first_token(logits)
        ready = [(token, float(logprobs[token].item()))]
        while True:
            for token, lp in ready:
                self.generated.append(token)
                self.pending = (token, lp, "")
                if self.t_first is None:
                    self.t_first = time.perf_counter()
                    self.prompt_tps = (len(self.ids) - self.cached) / (self.t_first - self.t_start)
                reason, piece = self._stop_reason(token, max_tokens)
                self.pending = (token, lp, piece)
                if reason is not None:
                    yield self._finish(token, lp, piece, reason)
                    return
                try:
                    yield self.step(piece, token, lp)
                except GeneratorExit:
                    self.keep_prefix()
                    raise
                self.pending = None
            # no drafts past max_tokens: they could only be thrown away
            k = max(1, min(num_draft, max_tokens - len(self.generated)))
            self.consistent = False
            ready = self.drafting.advance(token, k, switch)
            self.fed = list(self.drafting.tokens)
            self.consistent = True

    # -- stopping -------------------------------------------------------------------

    def _stop_reason(self, token: int, max_tokens: int):
        """(why generation stops at ``token``, or None; the text ``token`` adds)."""
        if token in self.eos:
            return "stop", ""
        piece, hit = self.text.add(token)
        if hit:
            return "stop", piece
        return ("length" if len(self.generated) >= max_tokens else None), piece

    def _finish(self, token, logprob, piece, reason) -> GenerationStep:
        if self.prompt_cache is not None:
            # Leave every sampled token in the cache, so the next turn only adds its own.
            if len(self.fed) < len(self.ids) + len(self.generated):
                if self.drafting is not None:
                    self.consistent = False
                    self.drafting.run_last(token)
                    self.fed = list(self.drafting.tokens)
                    self.consistent = True
                else:
                    self._run_model([token])
            self._add_snapshot()
        if reason != "stop" or token in self.eos:
            piece += self.text.flush()
        self.pending = None
        return self.step(piece, token, logprob, reason)

    def interrupted(self) -> GenerationStep:
        """The last step after a KeyboardInterrupt: the partial output, and the prompt cache
        updated when the cache holds whole forward passes."""
        if self.cache is None:
            self.cache = self.model.make_cache()
        elif self.prompt_cache is not None and self.consistent and len(self.fed) > self.cached:
            self._add_snapshot()
        token, lp, piece = self.pending if self.pending is not None else (None, None, "")
        return self.step(piece + self.text.flush(), token, lp, "interrupted")


DRAFTERS = ("none", "mtp", "dspark")


def _drafter(model, draft: str):
    """The module of ``model`` that drafts for the drafter named ``draft``, or None."""
    if draft == "mtp":
        layers = getattr(model, "mtp_layers", ())
        return layers[0] if layers else None
    if draft == "dspark":
        return getattr(model, "dspark", None)
    return None


def _drafting(model, cache, draft: str, drafter, distribution):
    """The speculative-decoding state of one generation with the drafter named ``draft``."""
    return DRAFTING[draft](model, cache, drafter, distribution=distribution)


def _has_drafter_state(snapshot: _Snapshot, draft: str, drafter) -> bool:
    return bool(snapshot.draft) and snapshot.draft["drafter"] == draft and \
        snapshot.draft["fingerprint"] == model_fingerprint(drafter)


def check_draft(model, draft, num_draft, *, temperature=0.0, sampler=None, logits_processors=None,
                repetition_penalty=None) -> None:
    """``GenerationParameterError`` when speculative decoding with ``draft`` cannot run as asked
    (``model`` None: every check but the checkpoint's drafter)."""
    if not _is_integer(num_draft) or not 1 <= num_draft <= MAX_DRAFT:
        raise GenerationParameterError("num_draft", f"must be an integer in 1..{MAX_DRAFT}, got {num_draft!r}")
    if draft is None or draft == "none":
        return
    if draft not in DRAFTERS:
        raise GenerationParameterError("draft", f"must be one of {', '.join(DRAFTERS)}, got {draft!r}")
    if sampler is not None:
        raise GenerationParameterError("draft", f"{draft!r} samples with the temperature, top-p, top-k and min-p "
                                                "settings, not with a custom sampler")
    if logits_processors or repetition_penalty is not None:
        raise GenerationParameterError("draft", f"{draft!r} runs no logits processors (repetition penalty)")
    if model is None:
        return
    dspark = getattr(model, "dspark", None)
    if draft == "mtp" and not getattr(model, "mtp_layers", ()):
        if dspark is not None:
            raise GenerationParameterError("draft", "'mtp' needs an MTP layer, but this checkpoint's mtp.* tensors "
                                                    "are a DSpark drafter: use draft 'dspark'")
        raise GenerationParameterError("draft", f"{draft!r} needs an MTP layer (mtp.* tensors), which this "
                                                "checkpoint does not have")
    if draft == "dspark":
        if dspark is None:
            raise GenerationParameterError("draft", "'dspark' needs a DSpark drafter (dspark_* keys in config.json "
                                                    "and mtp.* stages), which this checkpoint does not have")
        if num_draft > dspark.block_size:
            raise GenerationParameterError("num_draft", f"must be at most {dspark.block_size} with the DSpark drafter "
                                                        f"(its dspark_block_size), got {num_draft}")


def _checked_prompt_ids(model, tokenizer, prompt, *, max_tokens, temperature, top_p, top_k, min_p,
                        repetition_penalty, repetition_context_size, seed, stop, prompt_cache, prefill_step,
                        kv_cache_limit, on_overflow="error", chat_options=None) -> List[int]:
    """The prompt's token ids, after every check a generation makes before it runs."""
    check_sampling_parameters(model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty,
                              repetition_context_size=repetition_context_size, seed=seed, stop=stop)
    if prompt_cache is not None:
        prompt_cache.check_model(model)
    if prefill_step < 1:
        raise ValueError("prefill_step must be positive")
    return _prompt_token_ids(model, tokenizer, prompt, max_tokens=max_tokens, kv_cache_limit=kv_cache_limit,
                             on_overflow=on_overflow, prompt_cache=prompt_cache, chat_options=chat_options,
                             prefill_step=prefill_step)


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
    draft: Optional[str] = None,
    num_draft: int = 3,
    draft_switch: bool = True,
) -> Iterator[GenerationStep]:
    """Generate from ``prompt`` one token at a time.

    ``prompt``: text (tokenised as is, no BOS added; with a ``prompt_cache`` the part
    that repeats the cached history keeps the cached ids, see ``PromptCache.encode``),
    token ids, or a list of chat messages (encoded with
    ``mlx_dsv4.chat.encode_messages(**chat_options)``). A caller that closes the
    generator early still leaves the tokens decoded so far in ``prompt_cache``.
    Stops at an EOS id (``eos_token_ids``, default the tokenizer's), at the first stop
    string (not included in the text; at most ``MAX_STOP_STRINGS`` of at most
    ``MAX_STOP_LENGTH`` characters), after ``max_tokens``, or on KeyboardInterrupt
    (finish_reason "interrupted", the partial output kept). Sampling parameters out of
    range raise ``GenerationParameterError`` (a ValueError) before anything runs; a
    generation that fails leaves MLX's global random state as it found it.
    ``progress(done, total)`` is called after each prefill chunk. ``kv_cache_limit``
    (bytes) refuses prompts whose cache would not fit (``KVCacheLimitError``); with
    ``on_overflow="drop_oldest"`` a message-list prompt loses its oldest turns until it
    fits. ``snapshot_at`` lists extra prompt lengths at which ``prompt_cache`` keeps a
    snapshot (e.g. the end of the system prompt).
    ``draft="mtp"``: speculative decoding, the checkpoint's MTP layer proposing ``num_draft``
    (1..8) tokens per model forward pass; ``draft="dspark"``: the same with the checkpoint's
    DSpark drafter (V4-Flash-0731), up to its ``dspark_block_size`` tokens per pass. Greedy, the output is that of plain greedy decoding;
    sampled, it has the distribution of plain sampling with the same settings (no logits
    processors or custom sampler). With a ``prompt_cache`` its snapshots keep the drafter's
    state too; a snapshot without it (made without ``draft``) is not restored, the prompt is
    run from its start. The steps report the drafter's proposed and accepted token counts.
    With ``draft_switch`` decoding times speculative rounds against plain steps as it goes and
    drafts only while that is faster (a drafter the model keeps rejecting costs about one probe
    in every few hundred tokens); the output is the same either way.
    """
    if on_overflow not in ("error", "drop_oldest"):
        raise ValueError(f"on_overflow must be 'error' or 'drop_oldest', got {on_overflow!r}")
    ids = _checked_prompt_ids(model, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty,
                              repetition_context_size=repetition_context_size, seed=seed, stop=stop,
                              prompt_cache=prompt_cache, prefill_step=prefill_step, kv_cache_limit=kv_cache_limit,
                              on_overflow=on_overflow, chat_options=chat_options)
    check_draft(model, draft, num_draft, temperature=temperature, sampler=sampler,
                logits_processors=logits_processors, repetition_penalty=repetition_penalty)
    if draft == "none":
        draft = None

    random_seed = _global_random_seed()
    try:
        if seed is not None:
            mx.random.seed(seed)
        run = _new_generation(model, tokenizer, ids, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty,
                              repetition_context_size=repetition_context_size, stop=stop,
                              eos_token_ids=eos_token_ids, prompt_cache=prompt_cache,
                              logits_processors=logits_processors, sampler=sampler)
        try:
            with wired_limit(model):
                if draft is None:
                    run.prefill(prefill_step, set(snapshot_at), progress)
                    yield from run.decode(max_tokens)
                else:
                    distribution = sampling_distribution(temperature, top_p=top_p, top_k=int(top_k), min_p=min_p)
                    yield from run.decode_speculative(max_tokens, num_draft, prefill_step, progress, distribution,
                                                      DraftSwitch() if draft_switch else None, draft,
                                                      snapshot_at)
        except KeyboardInterrupt:
            if _global_random_seed() is None:
                _restore_global_random_seed(random_seed)
            yield run.interrupted()
    except Exception:
        _restore_global_random_seed(random_seed)
        raise


def _new_generation(model, tokenizer, ids, *, temperature, top_p, top_k, min_p, repetition_penalty,
                    repetition_context_size, stop, eos_token_ids, prompt_cache, logits_processors, sampler):
    if sampler is None:
        sampler = make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=int(top_k))
    processors = list(logits_processors or [])
    processors += make_logits_processors(repetition_penalty=repetition_penalty,
                                         repetition_context_size=repetition_context_size)
    eos = set(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
    return _Generation(model, tokenizer, ids, sampler=sampler, processors=processors, eos=eos, stop=stop,
                       prompt_cache=prompt_cache)


def open_generation(model, tokenizer, prompt: Union[str, Sequence[int]], *, max_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: Optional[float] = None, repetition_context_size: int = 20,
                    seed: Optional[int] = None, stop: Sequence[str] = (),
                    eos_token_ids: Optional[Iterable[int]] = None, prefill_step: int = 2048,
                    prompt_cache: Optional[PromptCache] = None, logits_processors: Optional[List[Callable]] = None,
                    kv_cache_limit: Optional[int] = None) -> "_Generation":
    """A generation of ``prompt`` (text or token ids) that its caller drives step by step, as
    ``stream_generate`` does, with the same checks: ``prefill`` it, then sample each token
    from its logits with ``pick`` and record it with ``take`` (``mlx_dsv4.batch`` decodes
    several such generations at once). ``seed_key``: the PRNG seed its sampling draws from
    when ``seed`` is given (the global MLX key otherwise)."""
    ids = _checked_prompt_ids(model, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty,
                              repetition_context_size=repetition_context_size, seed=seed, stop=stop,
                              prompt_cache=prompt_cache, prefill_step=prefill_step, kv_cache_limit=kv_cache_limit)
    run = _new_generation(model, tokenizer, ids, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
                          stop=stop, eos_token_ids=eos_token_ids, prompt_cache=prompt_cache,
                          logits_processors=logits_processors, sampler=None)
    run.max_tokens = max_tokens
    run.seed_key = seed
    return run


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
    if last.draft_proposed:
        stats.update(draft_proposed=last.draft_proposed, draft_accepted=last.draft_accepted)
    return GenerationResult("".join(pieces), tokens, last.finish_reason, stats, logprobs)
