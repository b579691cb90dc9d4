"""Speculative decoding with the checkpoint's MTP layer (or its DSpark drafter) as the drafter.

Each round the MTP layer drafts k tokens (feeding its own hc streams back for the drafts
after the first), the main model scores the last token and the k drafts in one forward
pass, and some prefix of the drafts is kept, followed by one token of the main model's own.
Greedy: the longest prefix equal to the main model's greedy choices. Sampling: each draft x,
drawn from the drafter's sampling distribution q, is kept with probability min(1, p(x)/q(x))
under the main model's p; at the first rejection the next token is drawn from the residual
max(0, p - q) renormalised, and after k acceptances from p. The emitted tokens then have
exactly the distribution plain sampling gives. Caches are then made exactly what plain
decoding of the kept tokens gives: the main cache and the drafter's are restored from
snapshots taken before the round and the kept tokens are run again (the main cache is
kept as is when every draft was accepted).

Invariant between rounds, with t_n the last emitted token (not yet run): the main cache
holds positions 0..n-1, the drafter's cache positions 0..n-2 (position i read the main
streams h_i and the token t_{i+1}), and `last_hidden` is h_{n-1}. With the DSpark drafter
(`DSparkDrafting`) the drafter's cache holds the tapped outputs of positions 0..n-1 and its
one pass over [t_n, mask, ...] proposes all k drafts.
"""

import math
import time
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx

MAX_DRAFT = 8


def _tokens(ids: Sequence[int]) -> mx.array:
    return mx.array([list(ids)], dtype=mx.int32)


def sampling_distribution(temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0):
    """The probabilities plain sampling draws from, as a function of logits [..., vocab]: mlx-lm's
    top-p, min-p and top-k masks in its sampler's order, then the temperature. None for greedy."""
    if temperature == 0:
        return None
    from .generate import _sample_utils as su

    methods = []
    if 0 < top_p < 1.0:
        methods.append(lambda x: su.apply_top_p(x, top_p))
    if min_p != 0.0:
        methods.append(lambda x: su.apply_min_p(x, min_p, 1))
    if top_k > 0:
        methods.append(lambda x: su.apply_top_k(x, top_k))

    def distribution(logits: mx.array) -> mx.array:
        logprobs = logits.astype(mx.float32)
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        for method in methods:
            logprobs = method(logprobs)
        return mx.softmax(logprobs / temperature, axis=-1)

    return distribution


def accept_drafts(drafts: Sequence[int], q: mx.array, p: mx.array) -> Tuple[int, int]:
    """(how many drafts are kept, the token that follows them) for drafts drawn from the rows of
    ``q`` [k, vocab], verified against the rows of ``p`` [k + 1, vocab]."""
    k = len(drafts)
    if k:
        index = mx.arange(k)
        chosen = mx.array(list(drafts))
        ratio = p[index, chosen] / mx.maximum(q[index, chosen], 1e-30)
        uniforms = mx.random.uniform(shape=(k,))
        kept = (uniforms < ratio).tolist()
    else:
        kept = []
    a = 0
    while a < k and kept[a]:
        a += 1
    if a < k:
        residual = mx.maximum(p[a] - q[a], 0.0)
        total = residual.sum()
        # p == q on every token leaves no residual; then p itself is the distribution
        row = mx.where(total > 0, residual / mx.maximum(total, 1e-30), p[a])
    else:
        row = p[k]
    return a, int(mx.random.categorical(mx.log(row)).item())


class Drafting:
    """Main model + MTP drafter state for one generation, greedy or sampled
    (``distribution``: from ``sampling_distribution``)."""

    # (tokens so far, the drafter's proposals) -> the proposals to verify; tests replace it
    adjust_drafts: Optional[Callable[[List[int], List[int]], List[int]]] = None
    # Positions the drafter's cache lags the main cache by between rounds: the MTP layer reads
    # position i with token i + 1, so it holds one fewer, and the last hidden state waits for it.
    cache_lag = 1

    def __init__(self, model, cache, drafter=None, distribution=None):
        if drafter is None:
            if not model.mtp_layers:
                raise ValueError("this checkpoint has no MTP layer (mtp.* tensors) to draft with")
            drafter = model.mtp_layers[0]
        self.model = model
        self.drafter = drafter
        self.distribution = distribution
        self.cache = cache
        self.draft_cache = drafter.make_cache(cache.kv_dtype, cache.index_dtype, dtype=model.dtype)
        self.last_hidden: Optional[mx.array] = None
        # positions run by plain steps that the drafter has not read yet: their streams and next tokens
        self.unread_hidden: List[mx.array] = []
        self.unread_tokens: List[int] = []
        self.tokens: List[int] = []  # every token run or to run next, prompt included
        self.proposed = 0
        self.accepted = 0
        self.rounds = 0

    def _draft_feed(self, hidden: mx.array, next_tokens: Sequence[int]):
        if hidden.shape[1]:
            return self.drafter(hidden, _tokens(next_tokens), self.model.embed, self.model.head, self.draft_cache)
        return None

    def prefill(self, ids: Sequence[int], step: int, progress=None) -> mx.array:
        """Run the prompt (all of it) in chunks of `step`; the last position's logits [vocab].
        ``progress(done, total)`` after each chunk."""
        logits = None
        for a in range(0, len(ids), step):
            b = min(len(ids), a + step)
            logits = self.extend(ids, a, b)
            if progress is not None:
                progress(b, len(ids))
        return logits

    def extend(self, ids: Sequence[int], a: int, b: int) -> mx.array:
        """Run ``ids[a:b]`` after the caches' ``ids[:a]`` (the main cache holding a positions,
        ``last_hidden`` that of position a - 1); the logits [vocab] of position b - 1."""
        logits, hidden = self.model(_tokens(ids[a:b]), self.cache, last_only=True, return_hidden=True)
        start = a
        if self.last_hidden is not None:
            hidden = mx.concatenate([self.last_hidden, hidden], axis=1)
            start = a - 1
        self._draft_feed(hidden[:, :-1], ids[start + 1 : b])
        self.last_hidden = hidden[:, -1:]
        mx.eval(self.last_hidden, self.cache.state(), self.draft_cache.state())
        self.tokens = list(ids[:b])
        return logits[0, -1]

    def _propose(self, token: int, k: int) -> Tuple[List[int], Optional[mx.array]]:
        """k drafts after ``token``, and (sampling) the drafter's distributions they came from."""
        drafts, rows, hidden, t = [], [], self.last_hidden, token
        for _ in range(k):
            logits, hidden = self.drafter(hidden, _tokens([t]), self.model.embed, self.model.head, self.draft_cache)
            if self.distribution is None:
                t = int(mx.argmax(logits[0, -1]).item())
            else:
                row = self.distribution(logits[0, -1])
                t = int(mx.random.categorical(mx.log(row)).item())
                rows.append(row)
            drafts.append(t)
        return drafts, (mx.stack(rows) if rows else None)

    def first_token(self, logits: mx.array) -> int:
        """The token that follows the prompt, from its last position's logits."""
        if self.distribution is None:
            return int(mx.argmax(logits).item())
        return int(mx.random.categorical(mx.log(self.distribution(logits))).item())

    def plain_step(self, token: int) -> List[Tuple[int, float]]:
        """One step of plain decoding after `token` (the last emitted one): [(next token, its
        log-probability)]. The drafter reads this position at the next round, with the others
        run since, in one pass."""
        logits, hidden = self.model(_tokens([token]), self.cache, return_hidden=True)
        logits = logits[0, -1]
        following = self.first_token(logits)
        lp = (logits[following] - mx.logsumexp(logits)).item()
        self.unread_hidden.append(self.last_hidden)
        self.unread_tokens.append(token)
        self.last_hidden = hidden[:, -1:]
        self.tokens.append(token)
        return [(following, lp)]

    def advance(self, token: int, k: int, switch: Optional["DraftSwitch"] = None) -> List[Tuple[int, float]]:
        """The tokens after ``token`` from one round of k drafts, or from one plain step while
        ``switch`` finds plain steps faster."""
        t0 = time.perf_counter()
        if switch is None or switch.speculate():
            kept = self.round(token, k)
        else:
            kept = self.plain_step(token)
        if switch is not None:
            switch.record(time.perf_counter() - t0, len(kept))
        return kept

    def _forward(self, ids: Sequence[int]):
        """(logits, what the drafter reads of each position) of the main model over ``ids``."""
        return self.model(_tokens(ids), self.cache, return_hidden=True)

    def _draft_snapshot(self):
        return self.draft_cache.to_state()

    def _read_kept(self, hidden: mx.array, kept: Sequence[int], draft_state) -> None:
        """The drafter's cache after a round, from its state before (``draft_state``): it has read
        the positions of the tokens run and kept, ``kept``, with their streams ``hidden``."""
        self.draft_cache.load_state(*draft_state)
        hidden = mx.concatenate([self.last_hidden, hidden], axis=1)
        self._draft_feed(hidden[:, :-1], kept)
        self.last_hidden = hidden[:, -1:]

    def _eval_state(self) -> None:
        mx.eval(self.last_hidden, self.cache.state(), self.draft_cache.state())

    def _read_unread(self) -> None:
        if self.unread_tokens:
            self._draft_feed(mx.concatenate(self.unread_hidden, axis=1), self.unread_tokens)
            self.unread_hidden, self.unread_tokens = [], []

    def run_last(self, token: int) -> None:
        """Run ``token`` (the last emitted one, that no token follows) through the main model, so
        that the caches hold every token; the drafter reads every position but that one."""
        _, hidden = self.model(_tokens([token]), self.cache, return_hidden=True)
        self.unread_hidden.append(self.last_hidden)
        self.unread_tokens.append(token)
        self.last_hidden = hidden[:, -1:]
        self.tokens.append(token)
        self._read_unread()
        mx.eval(self.last_hidden, self.cache.state(), self.draft_cache.state())

    def drafter_state(self) -> Tuple[dict, dict]:
        """(arrays, metadata) of the drafter's side of the invariant (its cache and
        ``last_hidden``), for ``load_drafter_state`` on a main cache restored to the same tokens.
        The drafter first reads the positions plain steps ran since its last pass."""
        self._read_unread()
        arrays, meta = self.draft_cache.to_state()
        arrays = {f"cache.{name}": value for name, value in arrays.items()}
        if self.last_hidden is not None:  # a drafter that reads every position as it runs keeps none
            arrays["last_hidden"] = self.last_hidden
        mx.eval(list(arrays.values()))
        return arrays, dict(meta)

    def load_drafter_state(self, arrays: dict, meta: dict, tokens: Sequence[int]) -> None:
        """Take the drafter's side back from ``drafter_state``, the main cache holding ``tokens``."""
        cache_arrays = {name[len("cache."):]: value for name, value in arrays.items() if name.startswith("cache.")}
        self.draft_cache.load_state(cache_arrays, dict(meta))
        self.last_hidden = arrays.get("last_hidden")
        self.unread_hidden, self.unread_tokens = [], []
        self.tokens = list(tokens)

    def round(self, token: int, k: int) -> List[Tuple[int, float]]:
        """Draft k tokens after `token` (the last emitted one), verify them; the tokens that
        follow `token` as plain greedy decoding gives them, with their log-probabilities."""
        self._read_unread()
        draft_state = self._draft_snapshot()
        drafts, q = self._propose(token, k)
        if self.adjust_drafts is not None:
            drafts = list(self.adjust_drafts(self.tokens + [token], drafts))
        main_state = self.cache.to_state()
        fed = [token] + drafts
        logits, hidden = self._forward(fed)
        logprobs = logits[0] - mx.logsumexp(logits[0], axis=-1, keepdims=True)
        if self.distribution is None:
            targets = mx.argmax(logits[0], axis=-1).tolist()
            a = 0
            while a < k and drafts[a] == targets[a]:
                a += 1
        else:
            if self.adjust_drafts is not None:
                # forced drafts were not drawn from q: verify them as drafts from a point mass
                q = mx.zeros((k, logits.shape[-1])).at[mx.arange(k), mx.array(drafts)].add(1.0)
            a, following = accept_drafts(drafts, q, self.distribution(logits[0]))
            targets = drafts[:a] + [following]
        if a < k:
            self.cache.load_state(*main_state)
            _, hidden = self._forward(fed[: a + 1])
        self._read_kept(hidden[:, : a + 1], fed[: a + 1], draft_state)
        self._eval_state()
        self.tokens += fed[: a + 1]
        self.rounds += 1
        self.proposed += k
        self.accepted += a
        kept = targets[: a + 1]
        lps = logprobs[mx.arange(a + 1), mx.array(kept)].tolist()
        return list(zip(kept, lps))


class DraftSwitch:
    """Chooses between speculative rounds and plain steps by their measured seconds per emitted
    token, so that a drafter the model keeps rejecting does not slow decoding down. Each way is
    timed in windows of ``probe`` tokens: the running way gives way at once when it gets slower
    than the other's last figure, and the other is timed again after ``interval`` tokens (the
    interval doubles, up to ``max_interval``, each time such a probe confirms the choice). The
    interval is never shorter than what keeps a probe of the slower way within ``overhead`` of
    the time between probes: a drafter that makes tokens 7x slower is probed every 480 tokens."""

    def __init__(self, probe: int = 4, interval: int = 64, max_interval: int = 1024, overhead: float = 0.05):
        self.probe, self.first_interval, self.max_interval = probe, interval, max_interval
        self.overhead = overhead
        self.interval = interval
        self.rate = {True: None, False: None}  # seconds per token, per way (True: speculative)
        self.speculative = True
        self.probing = True  # the current way is being timed again (else it runs)
        self._run = 0  # tokens the current way has run since it was chosen
        self._seconds = 0.0
        self._tokens = 0

    def speculate(self) -> bool:
        return self.speculative

    def record(self, seconds: float, tokens: int) -> None:
        """What the last round or step of the current way took and emitted."""
        self._seconds += seconds
        self._tokens += tokens
        if self._tokens < self.probe:
            return
        way, rate = self.speculative, self._seconds / self._tokens
        old = self.rate[way]
        self.rate[way] = rate if old is None else (old + rate) / 2
        self._run += self._tokens
        self._seconds, self._tokens = 0.0, 0
        other = self.rate[not way]
        if other is None:  # time the other way once before choosing
            self._choose(not way, probing=True)
        elif self.probing:
            faster = self.rate[way] < other
            self.interval = self.first_interval if faster else min(self.max_interval, self.interval * 2)
            self._choose(way if faster else not way, probing=False)
        elif self.rate[way] > other:
            self.interval = self.first_interval
            self._choose(not way, probing=False)
        elif self._run >= self.interval:
            self._choose(not way, probing=True)

    def _choose(self, way: bool, probing: bool) -> None:
        self.speculative, self.probing, self._run = way, probing, 0
        if not probing and self.rate[not way] is not None and self.rate[way] > 0:
            # a probe of the other (slower) way costs probe * (ratio - 1) tokens' time
            ratio = self.rate[not way] / self.rate[way]
            self.interval = max(self.interval, math.ceil(self.probe * (ratio - 1) / self.overhead))


class DSparkDrafting(Drafting):
    """Main model + DSpark drafter state for one generation (see ``mlx_dsv4.dspark``). The
    drafter's cache reads every position the main model runs and keeps, as it runs: at each
    round it holds positions 0..n-1 for the anchor t_n at position n."""

    cache_lag = 0

    def __init__(self, model, cache, drafter=None, distribution=None):
        # ``drafter`` is taken for a constructor like Drafting's; the drafter is always model.dspark
        if model.dspark is None:
            raise ValueError("this checkpoint has no DSpark drafter (dspark_* config keys and mtp.* stages)")
        super().__init__(model, cache, drafter=model.dspark, distribution=distribution)

    def _forward(self, ids: Sequence[int], last_only: bool = False):
        return self.model(_tokens(ids), self.cache, last_only=last_only, return_hidden=True,
                          tap_layers=self.drafter.tap_layers)

    def extend(self, ids: Sequence[int], a: int, b: int) -> mx.array:
        logits, taps = self._forward(ids[a:b], last_only=True)
        self.drafter.read(taps, self.draft_cache)
        self._eval_state()
        self.tokens = list(ids[:b])
        return logits[0, -1]

    def run_last(self, token: int) -> None:
        _, taps = self._forward([token])
        self.drafter.read(taps, self.draft_cache)
        self.tokens.append(token)
        self._eval_state()

    def _propose(self, token: int, k: int) -> Tuple[List[int], Optional[mx.array]]:
        return self.drafter.propose(token, k, self.model.embed, self.model.head, self.draft_cache,
                                    self.distribution)

    def plain_step(self, token: int) -> List[Tuple[int, float]]:
        logits, taps = self._forward([token])
        logits = logits[0, -1]
        following = self.first_token(logits)
        lp = (logits[following] - mx.logsumexp(logits)).item()
        self.drafter.read(taps, self.draft_cache)
        self.tokens.append(token)
        return [(following, lp)]

    def _draft_snapshot(self):
        return None  # the drafted block never enters the drafter's cache: nothing to restore

    def _read_kept(self, hidden: mx.array, kept: Sequence[int], draft_state) -> None:
        self.drafter.read(hidden, self.draft_cache)

    def _eval_state(self) -> None:
        mx.eval(self.cache.state(), self.draft_cache.state())


# The drafting state of each drafter name (`--draft`).
DRAFTING = {"mtp": Drafting, "dspark": DSparkDrafting}
