"""Prompt tokenisation that stops at a token limit.

A prompt longer than the context must be refused after about the work and memory the
context itself takes, whatever its length. Two bounds, cheapest first:

- a token covers at most ``max_token_chars`` characters (the longest vocabulary entry:
  a byte-level entry has one character per byte, and a character is at least one byte),
  so a text has at least ``len(text) / max_token_chars`` tokens;
- the text is tokenised in pieces cut where the V4 tokenizer always splits, so the ids of
  the pieces joined are the ids of the whole, and counting stops once the limit is reached.

The cut points hold for the V4 ``tokenizer.json`` (no normaliser, the pre-tokeniser below,
added tokens that strip nothing). Another tokenizer is tokenised whole, as before.
"""

import json
import re

CHUNK_CHARS = 1 << 16
# A longer stretch without a single cut point (one "word" of the byte-level BPE) takes
# hundreds of bytes per character to tokenise; no real prompt has one.
MAX_UNBROKEN_CHARS = 1 << 20

_V4_NORMALIZERS = (None, {"type": "Sequence", "normalizers": []})
_V4_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
    {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"}, "behavior": "Isolated",
     "invert": False},
    {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|"
                                           "[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|"
                                           "\\s*[\r\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
]}

# Positions no pre-token of that tokenizer spans (each side's pieces are the same alone as
# within the whole): digit groups and CJK runs are split off first, and no alternative of the
# last pattern continues an ASCII letter with a space or punctuation, punctuation with a
# space, or a line break with anything visible.
_PUNCT = r"!-/:-@\[-`{-~"
_CJK = "\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff"
_CUT = re.compile(
    rf"(?<=[A-Za-z])(?=[ {_PUNCT}])"
    rf"|(?<=[{_PUNCT}])(?= )"
    r"|(?<=\n)(?=[!-~])"
    r"|(?<=[0-9])(?=[\x00-/:-\x7f])|(?<=[\x00-/:-\x7f])(?=[0-9])"
    rf"|(?<=[{_CJK}])(?=[^{_CJK}])|(?<=[^{_CJK}])(?=[{_CJK}])"
)


class PromptTooLong(ValueError):
    """The prompt has ``at_least`` tokens or more, which reaches ``limit``."""

    def __init__(self, at_least, limit):
        super().__init__(f"the prompt has at least {at_least} tokens (limit {limit})")
        self.at_least = at_least
        self.limit = limit


class UnbrokenRun(ValueError):
    """The prompt has a stretch longer than ``MAX_UNBROKEN_CHARS`` the tokenizer cannot be cut in."""

    def __init__(self):
        super().__init__(f"the prompt has a run of more than {MAX_UNBROKEN_CHARS} characters with no space, "
                         "line break, punctuation or digit to split it at")


def _splits_like_v4(config):
    model = config.get("model") or {}
    return (config.get("normalizer") in _V4_NORMALIZERS and config.get("pre_tokenizer") == _V4_PRE_TOKENIZER
            and model.get("type") == "BPE" and model.get("dropout") is None
            and not any(t.get("lstrip") or t.get("rstrip") or t.get("single_word")
                        for t in config.get("added_tokens", [])))


class PromptTokenizer:
    """``encode(text, limit)``: the ids of ``text``, or ``PromptTooLong`` once ``limit`` is reached."""

    def __init__(self, tokenizer, *, chunk_chars=CHUNK_CHARS):
        self.tokenizer = tokenizer
        self.chunk_chars = chunk_chars
        config = json.loads(tokenizer.tokenizer.to_str())
        self.bounded = _splits_like_v4(config)
        self.max_token_chars = max(len(piece) for piece in tokenizer.tokenizer.get_vocab(with_added_tokens=True))
        added = [t["content"] for t in config.get("added_tokens", [])]
        # a cut between two characters that occur together in an added token could split one
        self._added_pairs = {token[k:k + 2] for token in added for k in range(len(token) - 1)}

    def _cut_after(self, text, position):
        """The first cut point from ``position`` on; len(text) when there is none, None when
        there is none in the next MAX_UNBROKEN_CHARS characters and the text goes on."""
        last = position + MAX_UNBROKEN_CHARS
        while True:
            match = _CUT.search(text, position, last + 1)
            if match is None:
                return len(text) if last >= len(text) else None
            cut = match.start()
            if text[cut - 1:cut + 1] not in self._added_pairs:
                return cut
            position = cut + 1

    def tokens_at_least(self, chars):
        """The fewest tokens any text holding ``chars`` characters has by the first bound; 0 for a
        tokenizer this module does not bound (``encode`` tokenises its text whole)."""
        return -(-chars // self.max_token_chars) if self.bounded else 0

    def encode(self, text, limit=None):
        if limit is None or not self.bounded:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if limit is not None and len(ids) >= limit:
                raise PromptTooLong(len(ids), limit)
            return ids
        ids, start = [], 0
        while start < len(text):
            at_least = len(ids) + self.tokens_at_least(len(text) - start)
            if at_least >= limit:
                raise PromptTooLong(at_least, limit)
            end = self._cut_after(text, start + self.chunk_chars)
            if end is None:
                raise UnbrokenRun()
            ids += self.tokenizer.encode(text[start:end], add_special_tokens=False)
            if len(ids) >= limit:
                raise PromptTooLong(len(ids), limit)
            start = end
        return ids
