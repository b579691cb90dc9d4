"""JSON as the wire format writes and reads it, caller text inside a prompt, and the check for
reserved protocol strings.

Depends only on ``errors`` and ``special``, which import nothing, so every other module
of the package can use it without forming an import cycle.
"""

import json
import math

from .errors import ChatFormatError
from .special import RESERVED_STRINGS


def to_json(value):
    """JSON exactly as the official encoder writes it: default separators, no ASCII escaping.

    NaN and infinities are refused (``ValueError``): they are not JSON.
    """
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def strict_json_loads(text):
    """``json.loads`` for strict JSON: no NaN, Infinity or -Infinity, no number that overflows
    to infinity. Raises ``ValueError`` (``json.JSONDecodeError`` for syntax errors)."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def name_fault(name):
    """What a tool or parameter name holds that its ``name="..."`` attribute cannot (a protocol
    string, a '"' or a newline), or None."""
    return next((bad for bad in ('"', "\n") + RESERVED_STRINGS if bad in name), None)


def check_reserved(text, *, index=None, field=None):
    """Raise if ``text`` contains a string that would tokenise to a protocol token."""
    for reserved in RESERVED_STRINGS:
        if reserved in text:
            raise ChatFormatError(
                f"contains the reserved protocol string {reserved!r}", index=index, field=field
            )


# Caller text (message content, tool results, schemas, argument values) is tokenised as
# ordinary text even where it spells a protocol token. While a prompt is being rendered, such
# text sits between these two Unicode noncharacters, which are reserved for internal use and
# so never part of the text itself; ``prompt_text`` turns them into spans.
LITERAL_OPEN = "\ufdd0"
LITERAL_CLOSE = "\ufdd1"


def literal(text, *, index=None, field=None):
    """``text`` marked as caller text (empty text needs no mark)."""
    if LITERAL_OPEN in text or LITERAL_CLOSE in text:
        raise ChatFormatError("contains U+FDD0 or U+FDD1, Unicode noncharacters reserved for internal use",
                              index=index, field=field)
    return LITERAL_OPEN + text + LITERAL_CLOSE if text else text


def unmark(text):
    """``text`` without caller-text marks."""
    return text.replace(LITERAL_OPEN, "").replace(LITERAL_CLOSE, "")


class PromptText(str):
    """Prompt text that knows which characters came from the caller (``literal_spans``, sorted
    ``(start, end)`` pairs). The V4 tokenizer never turns those characters into protocol tokens;
    slicing and concatenation keep the spans."""

    literal_spans = ()

    def __new__(cls, text, literal_spans=()):
        obj = super().__new__(cls, text)
        obj.literal_spans = tuple(literal_spans)
        return obj

    def __getitem__(self, key):
        part = str.__getitem__(self, key)
        if not isinstance(key, slice) or key.step not in (None, 1):
            return part
        start, stop, _ = key.indices(len(self))
        spans = [(max(a, start) - start, min(b, stop) - start) for a, b in self.literal_spans if a < stop and b > start]
        return PromptText(part, spans)

    def __add__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        if not other:
            return self
        shift = len(self)
        return PromptText(str(self) + other, self.literal_spans + tuple(
            (a + shift, b + shift) for a, b in getattr(other, "literal_spans", ())))

    def __radd__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        shift = len(other)
        return PromptText(other + str(self), tuple((a + shift, b + shift) for a, b in self.literal_spans))


def prompt_text(marked):
    """The ``PromptText`` of rendered text whose caller text is marked by ``literal``: ``marked``
    is that text or its pieces in order. The text is copied once, with the marks left out (they
    widen a string to two bytes a character, so a copy of the marked text costs double)."""
    pieces, spans, length = [], [], 0
    inside, start = False, 0
    for text in (marked,) if isinstance(marked, str) else marked:
        position = 0
        while True:
            found = text.find(LITERAL_CLOSE if inside else LITERAL_OPEN, position)
            end = len(text) if found < 0 else found
            if end > position:
                pieces.append(text[position:end])
                length += end - position
            if found < 0:
                break
            if inside:
                spans.append((start, length))
            start, inside, position = length, not inside, found + 1
    return PromptText("".join(pieces), spans)
