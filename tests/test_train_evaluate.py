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


class ChatOracle:
    """Answers the chat task's single-turn questions as the task does (capitals from COUNTRIES, the
    words after "Repeat after me: ", GREETINGS' replies), one token per call; `wrong_capitals` names
    the next country's capital instead."""

    def __init__(self, tokenizer, wrong_capitals=False):
        from mlx_dsv4.train.data import COUNTRIES, GREETINGS

        self.tokenizer, self.greetings = tokenizer, dict(GREETINGS)
        capitals = list(COUNTRIES.values())
        self.capitals = dict(zip(COUNTRIES, capitals[1:] + capitals[:1] if wrong_capitals else capitals))
        self.vocab_size = tokenizer.vocab_size

    def make_cache(self, *args):
        return []

    def reply(self, question):
        if question.startswith("What is the capital of "):
            country = question[len("What is the capital of "):-1]
            return f"The capital of {country} is {self.capitals[country]}."
        if question.startswith("Repeat after me: "):
            return question[len("Repeat after me: "):]
        return self.greetings[question]

    def __call__(self, tokens, cache=None, last_only=False):
        if not cache:
            prompt = self.tokenizer.decode(np.array(tokens)[0].tolist())
            question = prompt.split("<｜User｜>")[1].split("<｜Assistant｜>")[0]
            cache.extend(self.tokenizer.encode(self.reply(question)) + [self.tokenizer.eos_token_id])
        logits = np.zeros((1, 1, self.vocab_size), np.float32)
        logits[0, 0, cache.pop(0)] = 1
        return mx.array(logits)


def test_chat_accuracy_counts_exact_replies_per_kind(tokenizer):
    from mlx_dsv4.train.evaluate import chat_accuracy

    right = chat_accuracy(ChatOracle(tokenizer), tokenizer, n=9)
    assert right == {"n": 9, "accuracy": 1.0, "capital": 1.0, "repeat": 1.0, "greeting": 1.0}
    wrong = chat_accuracy(ChatOracle(tokenizer, wrong_capitals=True), tokenizer, n=9)
    assert wrong["capital"] == 0 and wrong["repeat"] == wrong["greeting"] == 1 and wrong["accuracy"] == 6 / 9
