"""Incremental parsing of a V4 completion into reasoning, content and tool calls.

``DSMLStreamParser`` is fed text chunks (``feed``) or token ids (``feed_tokens``) and
returns events; ``finish`` ends the input. The events do not depend on the chunking
beyond how deltas are split, and content deltas never hold any part of a DSML tag or
``</think>``: text that may start a marker is held back until it is decided.

Strict mode raises ``ChatFormatError`` with the byte offset at the first deviation
from the official format. Lenient mode repairs the known near-misses (ASCII ``|`` in
tags, a missing ``string`` attribute, unquoted attribute values, a missing ``</think>``,
stray protocol tokens, text around the tool-call block) and lists each repair in
``Done.repairs``; calls of a block that never closed are discarded, never returned.

``ToolCallComplete`` events for a block come when its closing tag arrives; a call
announced by ``ToolCallStarted`` that turns out malformed or truncated never completes.
"""

import re
import secrets
from dataclasses import dataclass

from .errors import ChatFormatError
from .lexer import Lexer
from .special import INVOKE_TAG, PARAMETER_TAG, TOOL_CALLS_TAG
from .wiretext import name_fault, strict_json_loads, to_json


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    index: int
    name: str


@dataclass(frozen=True)
class ToolCallComplete:
    index: int
    name: str
    arguments: str  # JSON text of an object
    id: str


@dataclass(frozen=True)
class Done:
    eos: bool  # the completion ended with the end-of-sentence token
    repairs: tuple = ()


_WHITESPACE = " \t\r\n"
_STRICT_INVOKE_ATTRIBUTES = re.compile(r' name="([^"]*)"')
_STRICT_PARAMETER_ATTRIBUTES = re.compile(r' name="([^"]*)" string="(true|false)"')
_ATTRIBUTE = re.compile(r"""\s*([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=]+))""")


def default_call_id(index):
    return "call_" + secrets.token_hex(12)


@dataclass
class _Call:
    index: int
    name: str
    offset: int
    parameters: dict
    broken: bool = False


class DSMLStreamParser:
    """Turns a completion, fed in pieces, into events.

    ``thinking_mode`` is "thinking" when the prompt ended with ``<think>`` (the text
    starts with reasoning) and "chat" otherwise. ``tokenizer`` (with
    ``new_detokenizer()``) is needed for ``feed_tokens`` only. ``call_id_factory(index)``
    makes the id of each completed call.
    """

    def __init__(self, thinking_mode="chat", *, strict=False, tokenizer=None, call_id_factory=None):
        if thinking_mode not in ("chat", "thinking"):
            raise ChatFormatError("must be 'chat' or 'thinking'", field="thinking_mode")
        self.strict = strict
        self._lexer = Lexer()
        self._state = "reasoning" if thinking_mode == "thinking" else "content"
        self._block_state = None
        self._held_whitespace = []  # pieces: held back one by one, joined once
        self._gap = []  # pieces of the text between two tags of a tool_calls block
        self._gap_offset = 0
        self._call = None
        self._parameter = None  # [name, string flag or None, value pieces, offset]
        self._block_calls = []
        self._block_offset = 0
        self._calls_started = 0
        self._eos = False
        self._finished = False
        self._after_end_reported = False
        self._after_block_reported = False
        self._after_block_offset = 0
        self.repairs = []
        self._events = []
        self._call_id = call_id_factory or default_call_id
        self._tokenizer = tokenizer
        self._detokenizer = None

    # -- input -----------------------------------------------------------------

    def feed(self, text):
        """Events decided by ``text``."""
        if self._finished:
            raise ChatFormatError("the parser has already finished")
        for token in self._lexer.feed(text):
            self._dispatch(token)
        return self._take_events()

    def feed_tokens(self, token_ids):
        """Events decided by ``token_ids`` (decoded with the tokenizer's streaming detokenizer)."""
        if self._tokenizer is None:
            raise ChatFormatError("feed_tokens needs a tokenizer")
        if self._detokenizer is None:
            self._detokenizer = self._tokenizer.new_detokenizer()
        for token_id in token_ids:
            self._detokenizer.add_token(int(token_id))
        return self.feed(self._detokenizer.last_segment)

    def finish(self):
        """Events for the rest of the input, ending with ``Done``."""
        if self._finished:
            raise ChatFormatError("the parser has already finished")
        tail = ""
        if self._detokenizer is not None:
            self._detokenizer.finalize()
            tail = self._detokenizer.last_segment
        for token in self._lexer.feed(tail, final=True):
            self._dispatch(token)
        self._finished = True
        end = self._lexer.offset
        if self._state == "reasoning":
            self._problem("the completion ended inside the reasoning (no </think>)", end, "kept as reasoning")
            self._flush_whitespace(ReasoningDelta)
        elif self._state == "content":
            self._flush_whitespace(ContentDelta)
        elif self._state == "block":
            self._truncated_block(end)
            self._state = "truncated"
        self._events.append(Done(self._eos, tuple(self.repairs)))
        return self._take_events()

    # -- helpers ---------------------------------------------------------------

    def _take_events(self):
        events, self._events = self._events, []
        return events

    def _problem(self, message, offset, repair="repaired"):
        """Raise in strict mode; record what was done about it in lenient mode."""
        if self.strict:
            raise ChatFormatError(message, offset=offset)
        self.repairs.append(f"byte {offset}: {message}; {repair}")

    def _emit(self, kind, text):
        if text:
            self._events.append(kind(text))

    def _add_text(self, kind, text):
        # Trailing whitespace waits: before a tool-call block its last blank line is not content.
        kept = text.rstrip(_WHITESPACE)
        if kept:
            self._emit(kind, "".join(self._held_whitespace) + kept)
            self._held_whitespace = []
        trailing = text[len(kept) :]
        if trailing:
            self._held_whitespace.append(trailing)

    def _flush_whitespace(self, kind):
        self._emit(kind, "".join(self._held_whitespace))
        self._held_whitespace = []

    def _drop(self, token, what):
        self._problem(f"unexpected {what} {token.raw[:40]!r}", token.offset, "dropped")

    # -- dispatch --------------------------------------------------------------

    def _dispatch(self, token):
        state = self._state
        if state == "reasoning":
            self._in_reasoning(token)
        elif state == "content":
            self._in_content(token)
        elif state == "block":
            self._in_block(token)
        elif state == "after_block":
            self._after_block(token)
        elif state == "done":
            self._after_end(token)

    def _partial_as_text(self, token):
        """A marker cut off by the end of input: plain text unless it was a DSML tag."""
        if "DSML" not in token.raw:
            return token.raw
        self._problem(f"truncated DSML tag {token.raw[:40]!r}", token.offset, "dropped")
        return ""

    def _in_reasoning(self, token):
        kind = token.kind
        if kind == "partial":
            self._add_text(ReasoningDelta, self._partial_as_text(token))
        elif kind == "text":
            self._add_text(ReasoningDelta, token.raw)
        elif kind == "think_close":
            self._flush_whitespace(ReasoningDelta)
            self._state = "content"
        elif kind == "eos":
            self._problem("end of sentence inside the reasoning (no </think>)", token.offset)
            self._flush_whitespace(ReasoningDelta)
            self._eos = True
            self._state = "done"
        elif kind == "tag" and not token.closing and token.name in (TOOL_CALLS_TAG, INVOKE_TAG):
            self._problem("tool calls inside the reasoning (no </think>)", token.offset)
            self._start_block(token, ReasoningDelta)
        else:
            self._drop(token, "protocol marker in the reasoning")

    def _in_content(self, token):
        kind = token.kind
        if kind == "partial":
            self._add_text(ContentDelta, self._partial_as_text(token))
        elif kind == "text":
            self._add_text(ContentDelta, token.raw)
        elif kind == "eos":
            self._flush_whitespace(ContentDelta)
            self._eos = True
            self._state = "done"
        elif kind == "tag" and not token.closing and token.name in (TOOL_CALLS_TAG, INVOKE_TAG):
            self._start_block(token, ContentDelta)
        else:
            self._drop(token, "protocol marker in the content")

    def _start_block(self, token, kind):
        held = "".join(self._held_whitespace)
        self._held_whitespace = []
        if held.endswith("\n\n"):
            self._emit(kind, held[:-2])
        else:
            self._problem("the tool_calls block does not follow a blank line", token.offset)
        self._state = "block"
        self._block_state = "calls"
        self._block_offset = token.offset
        self._block_calls = []
        self._gap = []
        self._gap_offset = token.offset + len(token.raw.encode("utf-8"))
        if token.name == INVOKE_TAG:
            self._problem("<invoke> without an opening <tool_calls> tag", token.offset)
            self._gap = ["\n"]
            self._in_block(token)
        else:
            self._check_plain_tag(token)

    def _check_plain_tag(self, token):
        """Checks for a tag that takes no attributes."""
        if not token.exact:
            self._problem(f"ASCII '|' in DSML tag {token.raw[:40]!r}", token.offset)
        if token.attributes:
            self._problem(f"unexpected attributes in {token.raw[:40]!r}", token.offset, "ignored")

    def _check_gap(self, token, allowed):
        gap = "".join(self._gap)
        self._gap = []
        if gap in allowed:
            return
        if self.strict:
            raise ChatFormatError(
                f"expected {allowed[0]!r} between DSML tags, found {gap[:40]!r}", offset=self._gap_offset
            )
        if gap.strip(_WHITESPACE):
            self.repairs.append(f"byte {self._gap_offset}: text {gap[:40]!r} in the tool_calls block; discarded")

    def _in_block(self, token):
        kind = token.kind
        state = self._block_state
        if kind == "partial":
            self._truncated_block(token.offset)
            self._state = "truncated"
            return
        if state == "value":
            if kind == "tag" and token.closing and token.name == PARAMETER_TAG:
                self._check_plain_tag(token)
                self._end_parameter()
                self._block_state = "invoke"
                self._gap_offset = token.offset + len(token.raw.encode("utf-8"))
            elif kind in ("text", "think_open", "think_close", "bos"):
                self._parameter[2].append(token.raw)
            elif kind == "eos":
                self._truncated_block(token.offset)
                self._eos = True
                self._state = "done"
            else:
                self._problem(f"parameter {self._parameter[0]!r} is not closed", token.offset, "call discarded")
                self._call.broken = True
                self._parameter = None
                self._block_state = "invoke"
                self._gap = []
                self._in_block(token)
            return
        if kind == "text":
            if not self._gap:
                self._gap_offset = token.offset
            self._gap.append(token.raw)
            return
        if kind == "eos":
            self._truncated_block(token.offset)
            self._eos = True
            self._state = "done"
            return
        if kind != "tag":
            self._gap = []
            self._drop(token, "protocol marker in the tool_calls block")
            return
        name, closing = token.name, token.closing
        end_offset = token.offset + len(token.raw.encode("utf-8"))
        if state == "calls":
            if name == INVOKE_TAG and not closing:
                self._check_gap(token, ("\n",))
                self._start_call(token)
            elif name == TOOL_CALLS_TAG and closing:
                self._check_gap(token, ("\n",))
                self._check_plain_tag(token)
                self._end_block(end_offset)
            else:
                self._gap = []
                self._drop(token, "DSML tag")
        else:  # inside an invoke
            if name == PARAMETER_TAG and not closing:
                self._check_gap(token, ("\n",))
                self._start_parameter(token)
            elif name == INVOKE_TAG and closing:
                self._check_gap(token, ("\n", "\n\n") if not self._call.parameters else ("\n",))
                self._check_plain_tag(token)
                self._end_call()
            elif name == TOOL_CALLS_TAG or (name == INVOKE_TAG and not closing):
                # A call cut off by the next tag did not parse completely: it is never returned.
                self._gap = []
                self._problem(f"invoke {self._call.name!r} is not closed", token.offset, "call discarded")
                self._call.broken = True
                self._end_call()
                self._gap = ["\n"]
                self._in_block(token)
                return
            else:
                self._gap = []
                self._drop(token, "DSML tag")
        self._gap_offset = end_offset

    # -- tool calls ------------------------------------------------------------

    def _attributes(self, token, strict_pattern, names):
        """Attribute values by name (None when missing), repairing near-misses."""
        exact = strict_pattern.fullmatch(token.attributes)
        if not token.exact:
            self._problem(f"ASCII '|' in DSML tag {token.raw[:40]!r}", token.offset)
        if exact:
            return dict(zip(names, exact.groups()))
        if self.strict:
            raise ChatFormatError(f"malformed attributes in {token.raw[:60]!r}", offset=token.offset)
        found = {}
        for match in _ATTRIBUTE.finditer(token.attributes):
            value = next(group for group in match.groups()[1:] if group is not None)
            found.setdefault(match.group(1), value)
        values = {name: found.get(name) for name in names}
        # A merely missing attribute is reported where its absence is handled.
        canonical = "".join(f' {n}="{v}"' for n, v in values.items() if v is not None)
        if canonical != token.attributes:
            self._problem(f"irregular attributes in {token.raw[:60]!r}", token.offset, "read leniently")
        return values

    def _start_call(self, token):
        attributes = self._attributes(token, _STRICT_INVOKE_ATTRIBUTES, ("name",))
        name = attributes["name"] or ""
        self._call = _Call(self._calls_started, name, token.offset, {})
        self._calls_started += 1
        if not name:
            self._problem("invoke without a name", token.offset, "call discarded")
            self._call.broken = True
        elif self._unwritable(name, "invoke name", token.offset):
            self._call.broken = True
        else:
            self._events.append(ToolCallStarted(self._call.index, name))
        self._block_state = "invoke"

    def _unwritable(self, name, what, offset):
        """Whether a name holds a protocol string, a '"' or a newline, which no prompt can hold as a
        name again (a conversation continued with the call would be refused); strict mode raises."""
        bad = name_fault(name)
        if bad is None:
            return False
        problem = f"{what} {name[:40]!r} contains {bad!r}, which a prompt cannot hold in a name"
        if self.strict:
            raise ChatFormatError(problem, offset=offset)
        self._problem(problem, offset, "call discarded")
        return True

    def _start_parameter(self, token):
        attributes = self._attributes(token, _STRICT_PARAMETER_ATTRIBUTES, ("name", "string"))
        name, string = attributes["name"], attributes["string"]
        if not name:
            self._problem("parameter without a name", token.offset, "call discarded")
            self._call.broken = True
        elif self._unwritable(name, "parameter name", token.offset):
            self._call.broken = True
        if string not in ("true", "false", None):
            self._problem(f"string attribute {string!r} is neither true nor false", token.offset, "typed from its text")
            string = None
        self._parameter = [name or "", string, [], token.offset]
        self._block_state = "value"

    def _end_parameter(self):
        name, string, pieces, offset = self._parameter
        self._parameter = None
        text = "".join(pieces)
        if string == "true":
            value = text
        elif string == "false":
            try:
                value = strict_json_loads(text)
            except (ValueError, RecursionError):
                self._problem(f"parameter {name!r} is not valid JSON", offset, "kept as a string")
                value = text
        else:
            self._problem(f"parameter {name!r} has no string attribute", offset, "typed from its text")
            try:
                value = strict_json_loads(text)
            except (ValueError, RecursionError):
                value = text
            if isinstance(value, str):
                value = text
        if name in self._call.parameters:
            self._problem(f"duplicate parameter {name!r}", offset, "the last value is kept")
        self._call.parameters[name] = value

    def _end_call(self):
        call = self._call
        self._call = None
        self._block_state = "calls"
        if not call.broken:
            self._block_calls.append(call)
        else:
            self.repairs.append(f"byte {call.offset}: malformed call {call.name!r}; discarded")

    def _end_block(self, end_offset):
        for call in self._block_calls:
            arguments = to_json(call.parameters)
            self._events.append(ToolCallComplete(call.index, call.name, arguments, self._call_id(call.index)))
        self._block_calls = []
        self._state = "after_block"
        self._after_block_offset = end_offset

    def _truncated_block(self, offset):
        pending = len(self._block_calls) + (self._call is not None)
        if self.strict:
            raise ChatFormatError(
                f"the tool_calls block opened at byte {self._block_offset} is truncated", offset=offset
            )
        self.repairs.append(
            f"byte {self._block_offset}: tool_calls block truncated; {pending} call(s) discarded"
        )
        self._block_calls = []
        self._call = None
        self._parameter = None

    def _after_block(self, token):
        if token.kind == "eos":
            self._eos = True
            self._state = "done"
        elif token.kind == "text" and not token.raw.strip(_WHITESPACE) and not self.strict:
            pass
        elif not self._after_block_reported:
            # Reported once, at the block end, so the report does not depend on chunking.
            self._after_block_reported = True
            self._problem("text after the tool_calls block", self._after_block_offset, "discarded")

    def _after_end(self, token):
        if not self._after_end_reported or self.strict:
            self._after_end_reported = True
            self._problem("text after the end of the completion", token.offset, "discarded")
