"""The tiny model's evaluation reads what it should: a model that writes the expected text scores,
one that gets one token wrong does not."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train.data import TaskGenerator
from mlx_dsv4.train.evaluate import answer_after_result, call_token_accuracy
from mlx_dsv4.train.trainer import argument_positions


class Oracle:
    """Greedy logits that continue a fixed token sequence; records what it was fed."""

    def __init__(self, ids):
        self.ids, self.vocab_size, self.fed, self.calls = list(ids), max(ids) + 10, [], []

    def make_cache(self, *args):
        return self.fed

    def __call__(self, tokens, cache=None, last_only=False):
        cache.extend(np.array(tokens).ravel().tolist())
        self.calls.append(tokens.shape[1])
        logits = np.zeros((1, 1, self.vocab_size), np.float32)
        logits[0, 0, self.ids[len(cache)] if len(cache) < len(self.ids) else 0] = 1
        return mx.array(logits)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.mark.parametrize("n", range(3))
def test_answer_after_result_reads_the_final_answer(tokenizer, n):
    gen = TaskGenerator(tokenizer, seed=n, split="eval")
    ex = gen.example("tool")
    oracle = Oracle(ex.ids)
    assert answer_after_result(oracle, tokenizer, ex) == ex.meta["answer"]
    assert oracle.fed == ex.ids[:-1]  # all but the end token, which stops it
    # the prompt held the question, the call and the tool's result, and not the answer
    prompt, rest = tokenizer.decode(ex.ids[: oracle.calls[0]]), tokenizer.decode(ex.ids[oracle.calls[0]:])
    assert ex.meta["result"] in prompt and ex.meta["call"] in prompt and prompt.endswith("</think>")
    assert rest == ex.meta["answer"] + tokenizer.eos_token

    wrong = list(ex.ids)
    wrong[-3] = tokenizer.encode(" 7")[0] if tokenizer.decode([wrong[-3]]) != " 7" else tokenizer.encode(" 8")[0]
    assert answer_after_result(Oracle(wrong), tokenizer, ex) != ex.meta["answer"]


class TeacherOracle:
    """Full-sequence logits whose argmax is the next token of `ids`, except at `wrong` positions."""

    def __init__(self, ids, wrong=()):
        self.ids, self.wrong = list(ids), set(wrong)

    def make_cache(self, *args):
        return None

    def __call__(self, tokens, cache=None):
        fed = np.array(tokens)[0].tolist()
        assert fed == self.ids[: len(fed)]
        logits = np.zeros((1, len(fed), max(self.ids) + 10), np.float32)
        for j in range(len(fed)):
            logits[0, j, self.ids[j + 1] + (1 if j + 1 in self.wrong else 0)] = 1
        return mx.array(logits)


def test_call_token_accuracy_splits_arguments_from_the_rest(tokenizer):
    ex = TaskGenerator(tokenizer, seed=0, split="eval").example("tool")  # the example n=1 evaluates
    arguments = argument_positions(ex.ids, tokenizer)
    assert 1 < len(arguments) < 12
    template = ex.mask.index(True) + 2  # a template token of the call turn

    perfect = call_token_accuracy(TeacherOracle(ex.ids), tokenizer, n=1)
    assert (perfect["arguments"], perfect["rest"]) == (1.0, 1.0)
    assert perfect["arguments_tokens"] == len(arguments)
    assert perfect["arguments_by_tool"] == {ex.meta["call"]: {"right": len(arguments), "tokens": len(arguments)}}
    one_off = call_token_accuracy(TeacherOracle(ex.ids, {int(arguments[0]), template}), tokenizer, n=1)
    assert one_off["arguments"] == pytest.approx(1 - 1 / len(arguments))
    assert one_off["arguments_by_tool"][ex.meta["call"]]["right"] == len(arguments) - 1
    assert one_off["rest"] == pytest.approx(1 - 1 / one_off["rest_tokens"])
    after_the_call = len(ex.ids) - 2  # in the final answer, not the call turn
    assert call_token_accuracy(TeacherOracle(ex.ids, {after_the_call}), tokenizer, n=1)["rest"] == 1.0
