"""Grammar-constrained decoding with llguidance.

``json_grammar`` and ``tool_call_grammar`` write Lark grammars (llguidance's dialect) for
what the assistant may output after the prompt's transition: optionally free reasoning
up to ``</think>``, then a JSON value following a schema, or a DSML ``tool_calls`` block
whose invokes follow each tool's parameter schema. ``Constraint.matcher`` compiles one for
a V4 tokenizer, and ``GrammarLogitsProcessor`` masks every token the grammar does not
allow at each step (once the grammar is complete only EOS is left).

Protocol strings (``</think>``, ``｜DSML｜``, EOS) are matched as their single token ids
only: their ordinary-text spellings are excluded from every free-text part, since the
chat parser would read them as markers.
"""

import json
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from .chat.special import DSML, INVOKE_TAG, PARAMETER_TAG, THINK_CLOSE, TOKEN_IDS, TOOL_CALLS_TAG

# JSON laid out as the official encoder writes it (json.dumps defaults: ", " and ": "), with
# no other whitespace, so a hesitant model cannot pad a value forever.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_DSML_TOKEN = f"<[{TOKEN_IDS[DSML]}]>"
_THINK_CLOSE_TOKEN = f"<[{TOKEN_IDS[THINK_CLOSE]}]>"
# Text that the chat lexer would take for a marker (either pipe in DSML tags).
_MARKER_TEXT = r"/(?s:.*)([｜|]DSML[｜|]|<\/?think>|<｜(begin|end)▁of▁sentence｜>)(?s:.*)/"


class ConstraintError(ValueError):
    """A schema or tool definition that cannot be compiled into a grammar."""

    def __init__(self, problem, where=None):
        super().__init__(problem)
        self.problem = problem
        self.where = where  # the tool name, or None for a response format


def _lark_string(text):
    return json.dumps(text, ensure_ascii=False)


def _json_rule(name, schema, *, strict, defs=None):
    schema = {} if schema is True else dict(schema)
    if defs:
        schema = {**defs, **schema}
    options = dict(JSON_LAYOUT)
    options.update({"lenient": not strict})
    schema["x-guidance"] = options
    return f"{name}: %json {json.dumps(schema, ensure_ascii=False)}"


def _start(body, thinking):
    # In thinking mode the prompt ends with <think>: reasoning is free up to the </think> token.
    if thinking:
        return ["start: REASONING " + _THINK_CLOSE_TOKEN + " " + body,
                "REASONING: /(?s:.*)/ & ~" + _MARKER_TEXT]
    return ["start: " + body]


def json_grammar(schema, *, strict=True, thinking=False):
    """A grammar for one JSON value (laid out as ``JSON_LAYOUT``) following ``schema`` (after free reasoning in
    thinking mode). Not ``strict``: keywords llguidance cannot enforce are ignored."""
    return "\n".join(_start("answer", thinking) + [_json_rule("answer", schema, strict=strict)])


def _is_plain_string(schema):
    """Whether a value of ``schema`` is always a string, written raw (string="true")."""
    if not isinstance(schema, dict):
        return False
    if "enum" in schema:
        return bool(schema["enum"]) and all(isinstance(v, str) for v in schema["enum"])
    if "const" in schema:
        return isinstance(schema["const"], str)
    constrained = {"pattern", "format", "minLength", "maxLength", "$ref", "anyOf", "oneOf", "allOf", "not"}
    return schema.get("type") == "string" and not constrained & set(schema)


def _parameter_rules(rule, key, schema, *, strict, defs):
    """Rules for one ``<｜DSML｜parameter>`` line of ``key``."""
    close = f'"</" {_DSML_TOKEN} "{PARAMETER_TAG}>"'
    attributes = _lark_string(PARAMETER_TAG + ' name="' + key + '" string=')
    head = f'"<" {_DSML_TOKEN} {attributes}'
    if _is_plain_string(schema):
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            return [f'{rule}: {head} "\\"true\\">" ({" | ".join(_lark_string(v) for v in values)}) {close}']
        # Raw text ends at the first "</" that the DSML token follows; a value may hold
        # "</" itself, so it is a run of chunks that each end at a "</".
        return [f'{rule}: {head} "\\"true\\">" raw_chunk+ {_DSML_TOKEN} "{PARAMETER_TAG}>"']
    return [f'{rule}: {head} "\\"false\\">" {rule}_value {close}',
            _json_rule(f"{rule}_value", schema, strict=strict, defs=defs)]


def _invoke_rules(rule, function, *, strict):
    name = function["name"]
    parameters = function.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ConstraintError("'parameters' must be a JSON schema object", name)
    properties = parameters.get("properties") or {}
    required = [k for k in parameters.get("required") or () if isinstance(k, str)]
    if not isinstance(properties, dict):
        raise ConstraintError("'parameters.properties' must be an object", name)
    keys = list(properties) + [k for k in required if k not in properties]
    defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
    for key in keys:
        if '"' in key or "\n" in key or not key:
            raise ConstraintError(f"parameter name {key!r} cannot be written in DSML", name)
        if not isinstance(properties.get(key, {}), (dict, bool)) or properties.get(key) is False:
            raise ConstraintError(f"the schema of parameter {key!r} must be a JSON schema object", name)
    rules, items = [], []
    for i, key in enumerate(keys):
        item = f"{rule}_p{i}"
        rules += _parameter_rules(item, key, properties.get(key, {}), strict=strict, defs=defs)
        items.append(f'{item} "\\n"' if key in required else f'({item} "\\n")?')
    # As the renderer writes it: the parameters one a line, or an empty line when there are none.
    body = " ".join(items) if required else f'("\\n" | {" ".join(items)})' if items else '"\\n"'
    open_attributes = _lark_string(INVOKE_TAG + ' name="' + name + '">')
    open_tag = f'"<" {_DSML_TOKEN} {open_attributes} "\\n"'
    rules.insert(0, f'{rule}: {open_tag} {body} "</" {_DSML_TOKEN} "{INVOKE_TAG}>"')
    return rules


def tool_call_grammar(functions, *, several=False, strict=True, thinking=False, lead=""):
    """A grammar for a ``tool_calls`` block (after ``lead`` text and "\\n\\n", or after free
    reasoning in thinking mode): one invoke of one of ``functions`` (OpenAI function objects),
    or with ``several`` one or more, each with its required parameters and every value
    following its schema. Parameters come in the schema's order."""
    if not functions:
        raise ConstraintError("no tools to call")
    rules, invokes = [], []
    for i, function in enumerate(functions):
        invokes.append(f"invoke{i}")
        rules += _invoke_rules(f"invoke{i}", function, strict=strict)
    # "<" and "</" stay separate lexemes from the newlines: the lexer is greedy, so a
    # literal "\\n</" would swallow the "\\n<" that starts a further invoke.
    block = (f'"\\n\\n" "<" {_DSML_TOKEN} "{TOOL_CALLS_TAG}>\\n" invoke ' + ('("\\n" invoke)* ' if several else "")
             + f'"\\n" "</" {_DSML_TOKEN} "{TOOL_CALLS_TAG}>"')
    if lead:
        block = f"{_lark_string(lead)} {block}"
    return "\n".join(_start("block", thinking) + [
        "block: " + block,
        "invoke: " + " | ".join(invokes),
        "raw_chunk[lazy]: RAW_CHUNK",
        r"RAW_CHUNK: /(?s:.*)<\// & ~" + _MARKER_TEXT,
    ] + rules)


# -- the tokenizer as llguidance sees it (built once per tokenizer) ---------------------------

_ll_tokenizers = weakref.WeakKeyDictionary()
_ll_lock = threading.Lock()


def ll_tokenizer(tokenizer):
    """The llguidance view of a ``V4Tokenizer``, converted once (about a second) and cached.
    The protocol tokens are marked special there, so grammars can name them by id and no
    text pattern can produce them."""
    import llguidance

    with _ll_lock:
        converted = _ll_tokenizers.get(tokenizer)
        if converted is None:
            config = json.loads(tokenizer.tokenizer.to_str())
            protocol = set(TOKEN_IDS.values())
            for token in config.get("added_tokens", []):
                if token.get("id") in protocol:
                    token["special"] = True
            converted = llguidance.LLTokenizer(json.dumps(config), n_vocab=tokenizer.vocab_size,
                                               eos_token=sorted(tokenizer.eos_token_ids))
            _ll_tokenizers[tokenizer] = converted
        return converted


@dataclass
class Constraint:
    """A grammar for the assistant's output; ``prefix`` is output text already written
    into the prompt (a forced opening or a prefill), which the matcher consumes first."""

    grammar: str
    prefix: str = ""
    where: str = None  # what to name in errors: the request field the grammar comes from

    def matcher(self, tokenizer):
        """A fresh ``LLMatcher`` that has consumed the prefix; ConstraintError if the grammar
        does not compile or the prefix does not fit it."""
        import llguidance

        matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), self.grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(_short_error(matcher.get_error()), self.where)
        if self.prefix and not matcher.consume_tokens(tokenizer.encode(self.prefix)):
            raise ConstraintError(f"the assistant text given before the reply ({self.prefix!r}) does not fit "
                                  f"the required output format", self.where)
        return matcher


def _short_error(message):
    return message.strip().splitlines()[0] if message.strip() else "the grammar does not compile"


class GrammarLogitsProcessor:
    """An mlx-lm logits processor ``(tokens, logits) -> logits`` that sets every token the
    matcher does not allow to -inf, after feeding it the tokens sampled since the last call.
    The first call sees the prompt only; its length marks where generated tokens start."""

    def __init__(self, matcher, vocab_size):
        self.matcher = matcher
        self.start = None
        self.consumed = 0
        words = (vocab_size + 31) // 32
        self._bitmask = np.zeros((1, words), dtype=np.int32)

    def __call__(self, tokens, logits):
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        length = tokens.shape[-1]
        if self.start is None:
            self.start = length
        new = tokens[self.start + self.consumed:].tolist() if length > self.start + self.consumed else []
        for token in new:
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"constrained decoding: token {token} was sampled against the grammar: "
                                   f"{_short_error(self.matcher.get_error())}")
            self.consumed += 1
        fill_next_token_bitmask(self.matcher, self._bitmask)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        vocab = logits.shape[-1]
        if allowed.size < vocab:
            allowed = np.concatenate([allowed, np.zeros(vocab - allowed.size, dtype=np.uint8)])
        mask = mx.array(allowed[:vocab].astype(np.bool_))
        return mx.where(mask, logits, mx.array(-mx.inf, dtype=logits.dtype))

