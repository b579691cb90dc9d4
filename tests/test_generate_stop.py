"""Stop strings: where the text is cut, what is held back, how much work each token costs,
and the limits on their number and length."""

import random
import sys

import pytest

import mlx_dsv4.generate as generation
from generate_support import tiny_chat_model
from mlx_dsv4.generate import MAX_STOP_LENGTH, MAX_STOP_STRINGS, GenerationParameterError, stream_generate


class PieceTokenizer:
    """Token i decodes to ``pieces[i]``, one streaming segment per token."""

    def __init__(self, pieces):
        self.pieces = pieces

    def new_detokenizer(self):
        return PieceDetokenizer(self.pieces)


class PieceDetokenizer:
    def __init__(self, pieces):
        self.pieces = pieces
        self.last_segment = ""

    def reset(self):
        self.last_segment = ""

    def add_token(self, token):
        self.last_segment = self.pieces[token]

    def finalize(self):
        self.last_segment = ""


def streamed(pieces, stops):
    """(text handed out per token, then by the final flush; whether a stop string hit)."""
    stream = generation._TextStream(PieceTokenizer(pieces), stops)
    outputs = []
    for token in range(len(pieces)):
        out, hit = stream.add(token)
        outputs.append(out)
        if hit:
            return outputs, True
    outputs.append(stream.flush())
    return outputs, False


def expected(pieces, stops):
    """The same, by brute force over the whole text: cut at the earliest stop string found
    once a token completes one; otherwise hold back the longest end of the text that
    begins a stop string."""
    stops = [s for s in stops if s]
    text, emitted, outputs = "", 0, []
    for piece in pieces:
        text += piece
        starts = [i for s in stops for i in range(len(text)) if text.startswith(s, i)]
        if starts:
            outputs.append(text[emitted:min(starts)])
            return outputs, True
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        end = max(emitted, len(text) - hold)
        outputs.append(text[emitted:end])
        emitted = end
    outputs.append(text[emitted:])
    return outputs, False


@pytest.mark.parametrize(
    "pieces, stops",
    [
        (["ab", "cd", "e"], ["abcd", "bc"]),  # both complete in one token: the earlier start wins
        (["abc", "d", "e"], ["abcd", "bc"]),  # "bc" completes first
        (["x", "ab", "ab", "c", "y"], ["ababc", "abc"]),
        (["aa", "aa", "ab"], ["aaab"]),
        (["héllo wo", "rld", "!"], ["world", "lo w"]),
        (["no", " stop", " here"], ["zzz", ""]),
        (["a", "b"], []),
        (["", "ab", ""], ["b"]),
    ],
)
def test_cut_and_held_text_match_a_brute_force_search(pieces, stops):
    assert streamed(pieces, stops) == expected(pieces, stops)


def test_random_texts_and_stop_strings_match_a_brute_force_search():
    rng = random.Random(5)
    for _ in range(3000):
        alphabet = "ab" if rng.random() < 0.7 else "abc"
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 12))]
        assert streamed(pieces, stops) == expected(pieces, stops), (pieces, stops)


def lines_run_per_token(stream, n_tokens):
    """Python lines executed in mlx_dsv4/generate.py by each ``stream.add``: the work per token."""
    counts, count = [], [0]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == generation.__file__ else None

    for token in range(n_tokens):
        count[0] = 0
        sys.settrace(tracer)
        try:
            out, hit = stream.add(token)
        finally:
            sys.settrace(None)
        assert not hit
        counts.append(count[0])
    return counts


def test_work_per_token_does_not_grow_with_the_text():
    rng = random.Random(0)
    # As many stop strings of the longest length as allowed: half never begin in the text,
    # half keep a long prefix of themselves held back at every token.
    stops = ["y" + "".join(rng.choice("xyz") for _ in range(MAX_STOP_LENGTH - 1)) for _ in range(8)]
    stops += ["x" * (MAX_STOP_LENGTH - 1 - i) + "z" * (i + 1) for i in range(8)]
    assert len(stops) == MAX_STOP_STRINGS
    n = 3000
    stream = generation._TextStream(PieceTokenizer(["x"] * n), stops)
    counts = lines_run_per_token(stream, n)
    early, late = max(counts[10:110]), max(counts[-100:])
    assert late <= 2 * early, (early, late)
    assert "".join(streamed(["x"] * n, stops)[0]) == "x" * n


@pytest.fixture(scope="module")
def mt():
    return tiny_chat_model()


def test_stop_string_limits_are_enforced(mt):
    model, tok = mt
    ids = tok.encode("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>")
    at_the_limit = ["a" * MAX_STOP_LENGTH] * MAX_STOP_STRINGS
    steps = list(stream_generate(model, tok, ids, max_tokens=2, stop=at_the_limit))
    assert steps[-1].finish_reason == "length"
    with pytest.raises(GenerationParameterError, match=f"at most {MAX_STOP_STRINGS} strings") as caught:
        next(stream_generate(model, tok, ids, max_tokens=2, stop=["a"] * (MAX_STOP_STRINGS + 1)))
    assert caught.value.field == "stop" and isinstance(caught.value, ValueError)
    with pytest.raises(GenerationParameterError, match=f"at most {MAX_STOP_LENGTH} characters") as caught:
        next(stream_generate(model, tok, ids, max_tokens=2, stop=["ok", "a" * (MAX_STOP_LENGTH + 1)]))
    assert caught.value.field == "stop" and "item 1" in str(caught.value)
