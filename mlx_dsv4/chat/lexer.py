"""Incremental split of completion text into plain text and protocol markers.

A marker is ``<think>``, ``</think>``, BOS, EOS, a DSML tag (``<｜DSML｜name attrs>`` or
its closing form, also with ASCII ``|``) or a bare ``｜DSML｜``. Text that might still
turn out to be the start of a marker is held back until more text or the end of input
decides it, so the tokens produced do not depend on how the input was chunked (apart
from how plain text is split).
"""

import re
from dataclasses import dataclass

from .special import BOS, DSML, EOS, THINK_CLOSE, THINK_OPEN

_LITERALS = {THINK_OPEN: "think_open", THINK_CLOSE: "think_close", EOS: "eos", BOS: "bos"}
_LONGEST_LITERAL = max(map(len, _LITERALS))
_MAX_ATTRIBUTES = 1024  # a "tag" with no '>' within this many characters is plain text
_TAG = re.compile(r"</?[｜|]DSML[｜|]([^<>]{0,%d})>" % _MAX_ATTRIBUTES)
_TAG_HEAD = re.compile(r"</?[｜|]DSML[｜|]")
_HEAD_VARIANTS = tuple(
    f"<{slash}{a}DSML{b}" for slash in ("", "/") for a in "｜|" for b in "｜|"
)
# Only these can begin a marker; everything else is skipped at regex speed.
_MARKER_START = re.compile(r"<(?=[｜|/t]|\Z)|｜(?=D|\Z)")
_TAG_NAME = re.compile(r"[A-Za-z_]*")


@dataclass(frozen=True)
class Token:
    """``kind`` is text, think_open, think_close, eos, bos, stray (a bare ｜DSML｜), tag, or
    partial (the input ended inside what could have become a marker)."""

    kind: str
    raw: str
    offset: int  # UTF-8 byte offset of raw in the whole input
    closing: bool = False
    name: str = ""
    attributes: str = ""
    exact: bool = True  # both pipes of a tag are the full-width ones


def _tag_token(raw, offset):
    closing = raw[1] == "/"
    head = _TAG_HEAD.match(raw)
    inner = raw[head.end() : -1]
    name = _TAG_NAME.match(inner).group()
    exact = raw[head.start() + 1 + closing] == "｜" and head.group().endswith("｜")
    return Token("tag", raw, offset, closing, name, inner[len(name) :], exact)


class Lexer:
    def __init__(self):
        self._buffer = ""
        self._offset = 0  # byte offset of the buffer start

    def _emit_text(self, tokens, text):
        if text:
            tokens.append(Token("text", text, self._offset))
            self._offset += len(text.encode("utf-8"))

    def _classify(self, buffer, i, final):
        """(kind, length) of a marker at i, "wait" when more input could decide, or None for plain text."""
        rest_length = len(buffer) - i
        if buffer[i] == "｜":
            if buffer.startswith(DSML, i):
                return "stray", len(DSML)
            if not final and rest_length < len(DSML) and DSML.startswith(buffer[i:]):
                return "wait"
            return None
        for literal, kind in _LITERALS.items():
            if buffer.startswith(literal, i):
                return kind, len(literal)
        tag = _TAG.match(buffer, i)
        if tag:
            return "tag", tag.end() - i
        if final:
            return None
        if rest_length < _LONGEST_LITERAL:
            rest = buffer[i:]
            if any(literal.startswith(rest) for literal in _LITERALS):
                return "wait"
            if any(variant.startswith(rest) for variant in _HEAD_VARIANTS):
                return "wait"
        head = _TAG_HEAD.match(buffer, i)
        if head:
            tail = buffer[head.end() : head.end() + _MAX_ATTRIBUTES + 1]
            if len(tail) <= _MAX_ATTRIBUTES and "<" not in tail and ">" not in tail:
                return "wait"
        return None

    def feed(self, text, final=False):
        """Tokens decided by ``text`` (and, with ``final``, by the end of input)."""
        buffer = self._buffer + text
        tokens = []
        start = scan = 0
        while True:
            found = _MARKER_START.search(buffer, scan)
            if found is None:
                self._emit_text(tokens, buffer[start:])
                start = len(buffer)
                break
            i = found.start()
            decided = self._classify(buffer, i, final=False)
            if decided == "wait" and final:
                # Input ended inside what could have become a marker.
                self._emit_text(tokens, buffer[start:i])
                tokens.append(Token("partial", buffer[i:], self._offset))
                self._offset += len(buffer[i:].encode("utf-8"))
                start = len(buffer)
                break
            if decided is None:
                scan = i + 1
                continue
            self._emit_text(tokens, buffer[start:i])
            start = i
            if decided == "wait":
                break
            kind, length = decided
            raw = buffer[i : i + length]
            if kind == "tag":
                tokens.append(_tag_token(raw, self._offset))
            else:
                tokens.append(Token(kind, raw, self._offset))
            self._offset += len(raw.encode("utf-8"))
            start = scan = i + length
        self._buffer = buffer[start:]
        return tokens

    @property
    def offset(self):
        """Byte offset just past everything decided so far."""
        return self._offset
