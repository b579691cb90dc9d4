"""Greedy speculative decoding with the checkpoint's MTP layer as the drafter.

Each round the MTP layer drafts k tokens (feeding its own hc streams back for the drafts
after the first), the main model scores the last token and the k drafts in one forward
pass, and the longest prefix of drafts equal to the main model's greedy choices is kept,
followed by the main model's own next token. Caches are then made exactly what plain
decoding of the kept tokens gives: the main cache and the drafter's are restored from
snapshots taken before the round and the kept tokens are run again (the main cache is
kept as is when every draft was accepted).

Invariant between rounds, with t_n the last emitted token (not yet run): the main cache
holds positions 0..n-1, the drafter's cache positions 0..n-2 (position i read the main
streams h_i and the token t_{i+1}), and `last_hidden` is h_{n-1}.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx

MAX_DRAFT = 8


def _tokens(ids: Sequence[int]) -> mx.array:
    return mx.array([list(ids)], dtype=mx.int32)


class GreedyDrafting:
    """Main model + MTP drafter state for one greedy generation."""

    # (tokens so far, the drafter's proposals) -> the proposals to verify; tests replace it
    adjust_drafts: Optional[Callable[[List[int], List[int]], List[int]]] = None

    def __init__(self, model, cache, drafter=None):
        if drafter is None:
            if not model.mtp_layers:
                raise ValueError("this checkpoint has no MTP layer (mtp.* tensors) to draft with")
            drafter = model.mtp_layers[0]
        self.model = model
        self.drafter = drafter
        self.cache = cache
        self.draft_cache = drafter.make_cache(cache.kv_dtype, cache.index_dtype, dtype=model.dtype)
        self.last_hidden: Optional[mx.array] = None
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
            logits, hidden = self.model(_tokens(ids[a:b]), self.cache, last_only=True, return_hidden=True)
            start = a
            if self.last_hidden is not None:
                hidden = mx.concatenate([self.last_hidden, hidden], axis=1)
                start = a - 1
            self._draft_feed(hidden[:, :-1], ids[start + 1 : b])
            self.last_hidden = hidden[:, -1:]
            mx.eval(self.last_hidden, self.cache.state(), self.draft_cache.state())
            if progress is not None:
                progress(b, len(ids))
        self.tokens = list(ids)
        return logits[0, -1]

    def _propose(self, token: int, k: int) -> List[int]:
        drafts, hidden, t = [], self.last_hidden, token
        for _ in range(k):
            logits, hidden = self.drafter(hidden, _tokens([t]), self.model.embed, self.model.head, self.draft_cache)
            t = int(mx.argmax(logits[0, -1]).item())
            drafts.append(t)
        return drafts

    def round(self, token: int, k: int) -> List[Tuple[int, float]]:
        """Draft k tokens after `token` (the last emitted one), verify them; the tokens that
        follow `token` as plain greedy decoding gives them, with their log-probabilities."""
        draft_state = self.draft_cache.to_state()
        drafts = self._propose(token, k)
        if self.adjust_drafts is not None:
            drafts = list(self.adjust_drafts(self.tokens + [token], drafts))
        main_state = self.cache.to_state()
        fed = [token] + drafts
        logits, hidden = self.model(_tokens(fed), self.cache, return_hidden=True)
        logprobs = logits[0] - mx.logsumexp(logits[0], axis=-1, keepdims=True)
        targets = mx.argmax(logits[0], axis=-1).tolist()
        a = 0
        while a < k and drafts[a] == targets[a]:
            a += 1
        if a < k:
            self.cache.load_state(*main_state)
            _, hidden = self.model(_tokens(fed[: a + 1]), self.cache, return_hidden=True)
        self.draft_cache.load_state(*draft_state)
        hidden = mx.concatenate([self.last_hidden, hidden[:, : a + 1]], axis=1)
        self._draft_feed(hidden[:, :-1], fed[: a + 1])
        self.last_hidden = hidden[:, -1:]
        mx.eval(self.last_hidden, self.cache.state(), self.draft_cache.state())
        self.tokens += fed[: a + 1]
        self.rounds += 1
        self.proposed += k
        self.accepted += a
        kept = targets[: a + 1]
        lps = logprobs[mx.arange(a + 1), mx.array(kept)].tolist()
        return list(zip(kept, lps))
