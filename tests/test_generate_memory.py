"""The KV-cache memory guard: estimates against real caches, refusal, dropping old turns."""

import mlx.core as mx
import pytest

from mlx_dsv4 import memory

from generate_support import tiny_chat_model
from mlx_dsv4.chat import encode_messages
from mlx_dsv4.generate import (
    KVCacheLimitError,
    check_kv_limit,
    estimate_cache_bytes,
    estimate_run_bytes,
    fit_messages,
    generate,
    tokens_that_fit,
)


@pytest.fixture(scope="module")
def mt():
    return tiny_chat_model()


def real_cache_bytes(model, n, evaluate=True):
    cache = model.make_cache()
    model(mx.array([[(7 * i) % 1000 + 100 for i in range(n)]]), cache=cache)
    if evaluate:
        mx.eval(cache.state())
    return cache.nbytes


def test_estimate_equals_the_real_cache(mt):
    model, _ = mt
    for n in (10, 150, 383, 895):
        assert real_cache_bytes(model, n) == estimate_cache_bytes(model, n), n
    # Long sequences: the sizes of unevaluated caches (shapes are known without computing).
    for n in (2000, 5000):
        assert real_cache_bytes(model, n, evaluate=False) == estimate_cache_bytes(model, n), n
    assert estimate_cache_bytes(model, 5000) > estimate_cache_bytes(model, 2000)


def transient_bytes(model, n):
    return estimate_run_bytes(model, n) - estimate_cache_bytes(model, n)


def test_refusal_says_how_many_tokens_fit(mt):
    model, tok = mt
    limit = 40_000_000
    fit = tokens_that_fit(model, limit)
    assert fit > 1000
    assert real_cache_bytes(model, fit, evaluate=False) + transient_bytes(model, fit) <= limit
    assert real_cache_bytes(model, fit + 64, evaluate=False) + transient_bytes(model, fit + 64) > limit
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>")
    with pytest.raises(KVCacheLimitError) as err:
        generate(model, tok, prompt, max_tokens=fit, kv_cache_limit=limit)
    assert f"{fit} tokens fit" in str(err.value)
    assert f"at most {fit - len(prompt)} new tokens" in str(err.value)
    assert err.value.tokens_that_fit == fit
    # exactly what fits is accepted
    ok = generate(model, tok, prompt, max_tokens=4, kv_cache_limit=limit)
    assert len(ok.tokens) == 4


def test_limit_below_the_fixed_part(mt):
    model, tok = mt
    with pytest.raises(KVCacheLimitError, match="0 tokens fit"):
        generate(model, tok, [0, 1, 2], max_tokens=2, kv_cache_limit=1000)


def long_conversation():
    story = "The heron waited in the reeds for a very long time. " * 8
    return [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "First: " + story},
        {"role": "assistant", "content": "Noted. " + story},
        {"role": "user", "content": "Second: " + story},
        {"role": "assistant", "content": "Also noted."},
        {"role": "user", "content": "Third question, short."},
    ]


def test_drop_oldest_turns_to_fit(mt):
    model, tok = mt
    messages = long_conversation()
    last_two = [messages[0], messages[3], messages[4], messages[5]]
    last_only = [messages[0], messages[5]]
    n_full = len(tok.encode(encode_messages(messages)))
    n_two = len(tok.encode(encode_messages(last_two)))
    n_one = len(tok.encode(encode_messages(last_only)))
    assert n_one < n_two < n_full
    # a limit that holds the last turn and 8 new tokens, but not the one before it
    limit = estimate_run_bytes(model, n_one + 8)
    assert tokens_that_fit(model, limit) >= n_one + 8
    assert tokens_that_fit(model, limit) < n_two + 8

    kept, ids = fit_messages(model, tok, messages, max_tokens=8, kv_cache_limit=limit, on_overflow="drop_oldest")
    assert kept == last_only
    assert ids == tok.encode(encode_messages(last_only))

    result = generate(model, tok, messages, max_tokens=8, kv_cache_limit=limit, on_overflow="drop_oldest")
    assert result.stats["prompt_tokens"] == n_one
    assert len(result.tokens) == 8

    with pytest.raises(KVCacheLimitError, match="tokens fit"):
        generate(model, tok, messages, max_tokens=8, kv_cache_limit=limit)


def test_drop_oldest_cannot_drop_the_last_turn(mt):
    model, tok = mt
    with pytest.raises(KVCacheLimitError):
        generate(model, tok, long_conversation()[:2], max_tokens=8, kv_cache_limit=1000, on_overflow="drop_oldest")


def test_message_prompts_use_chat_options(mt):
    model, tok = mt
    messages = [{"role": "user", "content": "Hi"}]
    text = encode_messages(messages, thinking_mode="thinking", reasoning_effort="max")
    a = generate(model, tok, messages, max_tokens=4, chat_options={"thinking_mode": "thinking", "reasoning_effort": "max"})
    b = generate(model, tok, text, max_tokens=4)
    assert a.tokens == b.tokens
    assert a.stats["prompt_tokens"] == len(tok.encode(text))


FAKE_TRANSIENT = 7_000_000


@pytest.fixture
def fake_transient(monkeypatch):
    """The prefill transient replaced by a fixed figure far larger than the tiny model's cache."""
    seen = []

    def transient(config, chunk, context, *args, **kwargs):
        seen.append((chunk, context))
        return FAKE_TRANSIENT if chunk > 0 else 0

    monkeypatch.setattr(memory, "prefill_transient_bytes", transient)
    return seen


def test_the_guard_counts_the_prefill_transient(mt, fake_transient):
    model, tok = mt
    cache_1000 = estimate_cache_bytes(model, 1000)
    assert estimate_run_bytes(model, 1000) == cache_1000 + FAKE_TRANSIENT
    # the cache alone of 100000 tokens fits in less than the transient
    assert estimate_cache_bytes(model, 100_000) < FAKE_TRANSIENT
    assert tokens_that_fit(model, FAKE_TRANSIENT - 1) == 0
    limit = cache_1000 + FAKE_TRANSIENT
    fit = tokens_that_fit(model, limit)
    assert fit >= 1000 and estimate_cache_bytes(model, fit) + FAKE_TRANSIENT <= limit
    with pytest.raises(KVCacheLimitError, match=r"prefilling it in 2048-token chunks about 6\.7 MiB more"):
        check_kv_limit(model, 1000, 100, FAKE_TRANSIENT)
    # the chunk the transient is asked for is the prefill step that ends the sequence
    fake_transient.clear()
    estimate_run_bytes(model, 5000, prefill_step=512)
    assert fake_transient == [(512, 4488)]
    estimate_run_bytes(model, 300, prefill_step=512)
    assert fake_transient[-1] == (300, 0)


def test_generate_refuses_what_only_the_transient_overflows(mt, fake_transient):
    model, tok = mt
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>")
    limit = estimate_cache_bytes(model, len(prompt) + 4) * 10
    assert limit < FAKE_TRANSIENT
    with pytest.raises(KVCacheLimitError, match="0 tokens fit"):
        generate(model, tok, prompt, max_tokens=4, kv_cache_limit=limit)
    ok = generate(model, tok, prompt, max_tokens=4, kv_cache_limit=limit + FAKE_TRANSIENT)
    assert len(ok.tokens) == 4
