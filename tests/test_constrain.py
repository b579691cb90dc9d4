"""The grammars of constrained decoding, checked token by token with the real V4 tokenizer:
what each step allows (the protocol tokens by id only, EOS only at the end) and that
rendered DSML calls and JSON are accepted."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.chat import tool_calls_to_dsml
from mlx_dsv4.chat.special import DSML, EOS, THINK_CLOSE, TOKEN_IDS
from mlx_dsv4.constrain import (
    Constraint,
    ConstraintError,
    GrammarLogitsProcessor,
    json_grammar,
    tool_call_grammar,
)
from mlx_dsv4.server.common import forced_tool_prefix
from mlx_dsv4.tokenizer import load_tokenizer

THINK_CLOSE_ID, DSML_ID, EOS_ID = TOKEN_IDS[THINK_CLOSE], TOKEN_IDS[DSML], TOKEN_IDS[EOS]
SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "array", "items": {"type": "integer"}}},
          "required": ["kind", "n"], "additionalProperties": False}
NOTE = {"name": "note", "parameters": {"type": "object", "properties": {
    "text": {"type": "string"}, "level": {"enum": ["low", "high"]}, "count": {"type": "integer", "minimum": 1},
    "extra": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}},
    "required": ["text", "count"]}}
PING = {"name": "ping", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def plain_ids(tokenizer, text):
    """``text`` spelled with ordinary tokens only, protocol strings included."""
    return tokenizer.tokenizer.encode(text, add_special_tokens=False).ids


class Stepper:
    """Drives a GrammarLogitsProcessor as generation does: the history grows one token a step."""

    def __init__(self, tokenizer, constraint):
        self.processor = GrammarLogitsProcessor(constraint.matcher(tokenizer), tokenizer.vocab_size)
        self.history = [0, 1, 2]
        self.vocab = tokenizer.vocab_size

    def allowed(self):
        logits = self.processor(mx.array(self.history, dtype=mx.int32), mx.zeros((1, self.vocab)))
        return set(np.nonzero(np.isfinite(np.array(logits[0])))[0].tolist())

    def feed(self, ids):
        for token in ids:
            assert token in self.allowed(), token
            self.history.append(token)


def test_json_reply_is_laid_out_like_json_dumps_and_only_eos_follows_it(tokenizer):
    stepper = Stepper(tokenizer, Constraint(json_grammar(SCHEMA)))
    first = stepper.allowed()
    assert EOS_ID not in first and all(tokenizer.decode([t]).startswith("{") for t in first)
    matcher = Constraint(json_grammar(SCHEMA)).matcher(tokenizer)
    assert matcher.validate_tokens(tokenizer.encode('{"kind":"b"')) < len(tokenizer.encode('{"kind":"b"'))
    stepper.feed(tokenizer.encode('{"kind": "b", "n": [1, 22]'))
    assert tokenizer.encode(" ")[0] not in stepper.allowed()  # no whitespace padding
    stepper.feed(tokenizer.encode("}"))
    assert stepper.allowed() == {EOS_ID}


def test_thinking_reasoning_is_free_until_the_think_close_token(tokenizer):
    stepper = Stepper(tokenizer, Constraint(json_grammar(SCHEMA, thinking=True)))
    first = stepper.allowed()
    assert THINK_CLOSE_ID in first and EOS_ID not in first and len(first) > 100000
    stepper.feed(tokenizer.encode("Let me think: a JSON {object} </th") + plain_ids(tokenizer, "ink"))
    # "</think>" spelled with ordinary tokens would end the reasoning for the parser only.
    assert plain_ids(tokenizer, ">")[0] not in stepper.allowed()
    assert EOS_ID not in stepper.allowed()
    stepper.feed([THINK_CLOSE_ID])
    assert all(tokenizer.decode([t]).startswith("{") for t in stepper.allowed())


def rendered_calls(*calls):
    return "\n\n" + tool_calls_to_dsml([
        {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}} for name, arguments in calls])


def test_rendered_calls_are_accepted_and_end_with_eos(tokenizer):
    text = rendered_calls(("note", {"text": "a </b> tag\nand more", "count": 3, "extra": {"on": True}}),
                          ("ping", {}), ("note", {"text": "", "level": "high", "count": 1}))
    matcher = Constraint(tool_call_grammar([NOTE, PING], several=True)).matcher(tokenizer)
    assert matcher.consume_tokens(tokenizer.encode(text)), matcher.get_error()
    assert matcher.is_accepting()
    single = Constraint(tool_call_grammar([NOTE])).matcher(tokenizer)
    assert single.validate_tokens(tokenizer.encode(text)) < len(tokenizer.encode(text))  # one call only


@pytest.mark.parametrize("bad", [
    {"count": 3},  # a required parameter missing
    {"text": "x", "count": 0},  # below the minimum
    {"text": "x", "count": 2, "level": "mid"},  # not in the enum
    {"text": "x", "count": 2, "extra": {}},  # a nested required property missing
])
def test_calls_against_the_schema_are_refused(tokenizer, bad):
    ids = tokenizer.encode(rendered_calls(("note", bad)))
    matcher = Constraint(tool_call_grammar([NOTE, PING])).matcher(tokenizer)
    assert matcher.validate_tokens(ids) < len(ids)


def test_dsml_is_the_single_token_and_raw_text_cannot_spell_it(tokenizer):
    prefix = forced_tool_prefix("note")
    stepper = Stepper(tokenizer, Constraint(tool_call_grammar([NOTE]), prefix=prefix))
    assert stepper.allowed() == {tokenizer.encode("<")[0]}
    stepper.feed(tokenizer.encode("<"))
    assert stepper.allowed() == {DSML_ID}
    stepper.feed(tokenizer.encode(f'{DSML}parameter name="text" string="true">some </'))
    allowed = stepper.allowed()
    assert DSML_ID in allowed and EOS_ID not in allowed
    spelled = plain_ids(tokenizer, "｜") + plain_ids(tokenizer, "DSML") + plain_ids(tokenizer, "｜")
    assert DSML_ID not in spelled and tokenizer.decode(spelled) == DSML
    matcher = Constraint(tool_call_grammar([NOTE]), prefix=prefix).matcher(tokenizer)
    assert matcher.consume_tokens(tokenizer.encode(f'<{DSML}parameter name="text" string="true">a'))
    assert matcher.validate_tokens(spelled) < len(spelled)
    assert matcher.validate_tokens(plain_ids(tokenizer, "b</")) == len(plain_ids(tokenizer, "b</"))


def test_a_prefix_that_does_not_fit_and_bad_grammars_are_errors(tokenizer):
    with pytest.raises(ConstraintError, match="does not fit"):
        Constraint(json_grammar(SCHEMA), prefix="Sure:").matcher(tokenizer)
    with pytest.raises(ConstraintError, match="no-such-format"):
        Constraint(json_grammar({"type": "string", "format": "no-such-format"})).matcher(tokenizer)
    Constraint(json_grammar({"type": "string", "format": "no-such-format"}, strict=False)).matcher(tokenizer)
    with pytest.raises(ConstraintError, match="parameter name"):
        tool_call_grammar([{"name": "f", "parameters": {"type": "object", "properties": {'a"b': {}}}}])
    with pytest.raises(ConstraintError, match="'n' must be a JSON schema object"):
        tool_call_grammar([{"name": "f", "parameters": {"type": "object", "properties": {"n": 3}}}])


def test_names_are_written_as_the_renderer_writes_them(tokenizer):
    city = {"name": "ville", "parameters": {"type": "object", "properties": {"città": {"type": "integer"}},
                                            "required": ["città"]}}
    matcher = Constraint(tool_call_grammar([city])).matcher(tokenizer)
    assert matcher.consume_tokens(tokenizer.encode(rendered_calls(("ville", {"città": 7})))), matcher.get_error()
    assert matcher.is_accepting()


def test_sampling_a_token_the_mask_forbids_is_an_error(tokenizer):
    stepper = Stepper(tokenizer, Constraint(json_grammar(SCHEMA)))
    stepper.allowed()
    stepper.history += tokenizer.encode("hello")
    with pytest.raises(RuntimeError, match="against the grammar"):
        stepper.allowed()


def test_thinking_tool_call_follows_the_reasoning(tokenizer):
    call = rendered_calls(("ping", {}))
    matcher = Constraint(tool_call_grammar([PING], thinking=True)).matcher(tokenizer)
    # Before </think> everything is reasoning, where the DSML token has no place.
    assert matcher.validate_tokens(tokenizer.encode(call)) == tokenizer.encode(call).index(DSML_ID)
    ids = tokenizer.encode("I should ping." + THINK_CLOSE + call)
    assert matcher.consume_tokens(ids), matcher.get_error()
    assert matcher.is_accepting()
