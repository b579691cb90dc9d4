"""stream_generate / generate on a tiny random checkpoint with the real V4 tokenizer."""

import math

import mlx.core as mx
import pytest

from generate_support import tiny_chat_model
from mlx_dsv4.generate import GenerationStep, generate, stream_generate

PROMPT_TEXT = "<｜begin▁of▁sentence｜><｜User｜>Tell me a story about a cat.<｜Assistant｜></think>"


@pytest.fixture(scope="module")
def mt():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def prompt(mt):
    _, tok = mt
    return tok.encode(PROMPT_TEXT)


def manual_greedy(model, ids, n):
    """Argmax decoding straight over model(...), with log-softmax of the chosen ids."""
    cache = model.make_cache()
    x = mx.array([ids])
    tokens, logprobs = [], []
    for _ in range(n):
        logits = model(x, cache=cache)[0, -1].astype(mx.float32)
        token = int(mx.argmax(logits).item())
        tokens.append(token)
        logprobs.append(float((logits[token] - mx.logsumexp(logits)).item()))
        x = mx.array([[token]])
    return tokens, logprobs


def test_greedy_matches_manual_argmax_loop(mt, prompt):
    model, tok = mt
    expected, expected_lp = manual_greedy(model, prompt, 12)
    steps = list(stream_generate(model, tok, prompt, max_tokens=12))
    assert all(isinstance(s, GenerationStep) for s in steps)
    assert [s.token for s in steps] == expected
    for got, want in zip([s.logprob for s in steps], expected_lp):
        assert got == pytest.approx(want, abs=1e-3)
        assert got <= 0
    assert [s.finish_reason for s in steps] == [None] * 11 + ["length"]
    assert "".join(s.text for s in steps) == tok.decode(expected)
    last = steps[-1]
    assert last.prompt_tokens == len(prompt) and last.cached_tokens == 0
    assert last.generation_tokens == 12
    assert last.prompt_tps > 0 and last.generation_tps > 0
    assert last.cache_bytes > 0 and last.peak_memory > 0


def test_text_prompt_is_tokenised_as_is(mt, prompt):
    model, tok = mt
    from_text = generate(model, tok, PROMPT_TEXT, max_tokens=4)
    from_ids = generate(model, tok, prompt, max_tokens=4)
    assert from_text.tokens == from_ids.tokens
    assert from_text.stats["prompt_tokens"] == len(prompt)


def test_chunked_prefill_reports_progress_and_gives_same_tokens(mt, prompt):
    model, tok = mt
    long_prompt = prompt + tok.encode(" and then the dog barked" * 12)
    calls = []
    chunked = generate(model, tok, long_prompt, max_tokens=6, prefill_step=16,
                       progress=lambda done, total: calls.append((done, total)))
    whole = generate(model, tok, long_prompt, max_tokens=6, prefill_step=4096)
    assert chunked.tokens == whole.tokens
    total = len(long_prompt) - 1  # the last prompt token is fed with the first sample
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == math.ceil(total / 16)


def test_seeded_sampling_is_reproducible(mt, prompt):
    model, tok = mt
    opts = dict(max_tokens=10, temperature=1.0, top_p=0.95, min_p=0.01)
    a = generate(model, tok, prompt, seed=7, **opts).tokens
    b = generate(model, tok, prompt, seed=7, **opts).tokens
    c = generate(model, tok, prompt, seed=8, **opts).tokens
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(mt, prompt):
    model, tok = mt
    greedy = generate(model, tok, prompt, max_tokens=8).tokens
    assert generate(model, tok, prompt, max_tokens=8, temperature=5.0, top_k=1, seed=1).tokens == greedy


def test_repetition_penalty_avoids_repeating_context(mt, prompt):
    model, tok = mt
    continuation = generate(model, tok, prompt, max_tokens=12).tokens
    context = prompt + continuation + prompt  # invites repeating the continuation
    plain = generate(model, tok, context, max_tokens=10).tokens
    assert plain[0] in context
    penalised = generate(model, tok, context, max_tokens=10, repetition_penalty=5.0,
                         repetition_context_size=1000).tokens
    seen = set(context)
    for token in penalised:
        assert token not in seen
        seen.add(token)


def test_eos_stops_and_is_not_in_the_text(mt, prompt):
    model, tok = mt
    forced_at = 3

    def force_eos(history, logits):
        if history.size == len(prompt) + forced_at:
            logits = mx.where(mx.arange(logits.shape[-1]) == tok.eos_token_id, 1e9, -1e9)[None]
        return logits

    result = generate(model, tok, prompt, max_tokens=50, logits_processors=[force_eos])
    free = generate(model, tok, prompt, max_tokens=forced_at).tokens
    assert result.finish_reason == "stop"
    assert result.tokens == free + [tok.eos_token_id]
    assert result.text == tok.decode(free)
    assert tok.eos_token not in result.text


def test_custom_eos_ids(mt, prompt):
    model, tok = mt
    free = generate(model, tok, prompt, max_tokens=8).tokens
    stop_id = free[4]
    result = generate(model, tok, prompt, max_tokens=8, eos_token_ids=[stop_id])
    assert result.finish_reason == "stop"
    assert result.tokens == free[: free.index(stop_id) + 1]


def test_stop_string_across_tokens_is_cut(mt, prompt):
    model, tok = mt
    free = generate(model, tok, prompt, max_tokens=20)
    pieces = [tok.decode([t]) for t in free.tokens]
    # A stop string that starts inside one token and ends inside the next.
    i = next(k for k in range(2, 18) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2)
    stop = pieces[i][-1] + pieces[i + 1][:1]
    steps = list(stream_generate(model, tok, prompt, max_tokens=20, stop=[stop, "never-seen-xyz"]))
    text = "".join(s.text for s in steps)
    assert text == free.text[: free.text.find(stop)]
    assert steps[-1].finish_reason == "stop"
    assert stop not in text


def test_max_tokens(mt, prompt):
    model, tok = mt
    result = generate(model, tok, prompt, max_tokens=5)
    assert result.finish_reason == "length"
    assert len(result.tokens) == 5
    assert result.stats["generation_tokens"] == 5


def test_ctrl_c_during_decoding_keeps_partial_output(mt, prompt):
    model, tok = mt
    free = generate(model, tok, prompt, max_tokens=10)
    calls = []

    def interrupt_on_fifth(history, logits):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return logits

    steps = list(stream_generate(model, tok, prompt, max_tokens=10, logits_processors=[interrupt_on_fifth]))
    assert steps[-1].finish_reason == "interrupted"
    tokens = [s.token for s in steps if s.token is not None]
    assert tokens == free.tokens[: len(tokens)] and len(tokens) == 4
    text = "".join(s.text for s in steps)
    assert text == tok.decode(tokens)
    assert all(s.finish_reason is None for s in steps[:-1])


def test_ctrl_c_during_prefill(mt, prompt):
    model, tok = mt

    def progress(done, total):
        if done >= 8:
            raise KeyboardInterrupt

    steps = list(stream_generate(model, tok, prompt + prompt, max_tokens=5, prefill_step=4, progress=progress))
    assert len(steps) == 1
    assert steps[0].finish_reason == "interrupted"
    assert steps[0].token is None and steps[0].text == ""
    assert steps[0].generation_tokens == 0


def test_generate_result_collects_steps(mt, prompt):
    model, tok = mt
    steps = list(stream_generate(model, tok, prompt, max_tokens=6))
    result = generate(model, tok, prompt, max_tokens=6)
    assert result.text == "".join(s.text for s in steps)
    assert result.tokens == [s.token for s in steps]
    assert result.finish_reason == steps[-1].finish_reason
    assert result.stats["prompt_tokens"] == len(prompt)


def test_empty_prompt_is_rejected(mt):
    model, tok = mt
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [], max_tokens=2)
