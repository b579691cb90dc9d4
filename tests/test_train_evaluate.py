"""The tiny model's evaluation reads what it should: a model that writes the expected text scores,
one that gets one token wrong does not."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train.data import TaskGenerator
from mlx_dsv4.train.evaluate import answer_after_result


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
