"""Sampling parameters are checked before generating, and a failed generation leaves MLX's
global random state usable for the next one."""

import math
from functools import partial

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler

from generate_support import tiny_chat_model
from mlx_dsv4.generate import GenerationParameterError, check_sampling_parameters, generate, stream_generate

PROMPT_TEXT = "<｜begin▁of▁sentence｜><｜User｜>Tell me a story.<｜Assistant｜></think>"


@pytest.fixture(scope="module")
def mt():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def prompt():
    _, tokenizer = tiny_chat_model()
    return tokenizer.encode(PROMPT_TEXT)


@pytest.fixture(autouse=True)
def usable_random_state():
    """Keep a broken global key from spilling into other tests when a check here fails."""
    yield
    try:
        mx.eval(mx.random.state[0])
    except (RuntimeError, ValueError):
        mx.random.seed(0)


def random_key():
    return mx.random.state[0].tolist()


INVALID = [
    ("max_tokens", [0, -3, 1.5, True, None]),
    ("temperature", [-0.1, math.nan, math.inf, "1", None, 10**400]),
    ("top_p", [0, -0.5, 1.01, math.nan, None, 10**400]),
    ("top_k", [-1, "VOCAB", "VOCAB+7", 2.0, True]),
    ("min_p", [-0.01, 1.5, math.nan, -10**400]),
    ("repetition_penalty", [0, -1.0, math.inf, "2", 10**400]),
    ("repetition_context_size", [0, 2.5]),
    ("seed", [-1, 2**64, 1.5, "7"]),
]


@pytest.mark.parametrize("field, values", INVALID, ids=[f for f, _ in INVALID])
def test_invalid_sampling_parameters_are_refused_naming_the_field(mt, prompt, field, values):
    model, tok = mt
    vocab = model.args.vocab_size
    for value in values:
        if isinstance(value, str) and value.startswith("VOCAB"):
            value = vocab + (7 if value.endswith("7") else 0)
        before = random_key()
        with pytest.raises(GenerationParameterError) as caught:
            next(stream_generate(model, tok, prompt, **{field: value}))
        assert caught.value.field == field and str(caught.value).startswith(field + " ")
        assert isinstance(caught.value, ValueError)
        assert random_key() == before


def test_top_k_range_is_the_vocabulary(mt, prompt):
    model, tok = mt
    vocab = model.args.vocab_size
    with pytest.raises(GenerationParameterError, match=rf"\[0, {vocab}\)"):
        check_sampling_parameters(model, top_k=vocab)
    check_sampling_parameters(model, top_k=vocab - 1, temperature=0.7, top_p=1, min_p=0, repetition_penalty=1.1,
                              seed=2**64 - 1, max_tokens=1)
    result = generate(model, tok, prompt, max_tokens=3, temperature=0.7, top_k=vocab - 1, seed=3)
    assert len(result.tokens) == 3


def test_a_sampler_failing_while_compiled_does_not_break_later_sampling(mt, prompt):
    model, tok = mt
    before = random_key()
    # mlx-lm's compiled top-k raises while it is traced: without care, the global key is
    # left a placeholder and every later random draw in the process fails.
    broken = make_sampler(1.0, top_k=model.args.vocab_size)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, tok, prompt, max_tokens=3, sampler=broken)
    assert random_key() == before
    sampled = generate(model, tok, prompt, max_tokens=4, temperature=0.8)
    assert len(sampled.tokens) == 4
    seeded = [generate(model, tok, prompt, max_tokens=4, temperature=0.8, seed=11).tokens for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_a_failed_generation_leaves_the_random_state_as_it_found_it(mt, prompt):
    model, tok = mt
    calls = []

    def noisy_then_failing(history, logits):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("processor failed")
        return logits + mx.random.uniform(shape=logits.shape) * 1e-3

    before = random_key()
    with pytest.raises(RuntimeError, match="processor failed"):
        generate(model, tok, prompt, max_tokens=5, temperature=0.5, logits_processors=[noisy_then_failing])
    assert random_key() == before
    assert len(generate(model, tok, prompt, max_tokens=3, temperature=0.9).tokens) == 3


def test_an_interrupt_while_a_sampler_is_compiled_does_not_break_later_sampling(mt, prompt):
    model, tok = mt

    @partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
    def interrupted_sampler(logprobs):
        mx.random.categorical(logprobs)
        raise KeyboardInterrupt

    steps = list(stream_generate(model, tok, prompt, max_tokens=3, sampler=interrupted_sampler))
    assert [s.finish_reason for s in steps] == ["interrupted"]
    assert len(generate(model, tok, prompt, max_tokens=3, temperature=0.9).tokens) == 3
