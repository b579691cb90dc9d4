"""stream_generate with draft="mtp": the output of plain greedy decoding, stop handling included."""

import random

import pytest

import mlx.core as mx

from generate_support import tiny_chat_dir, tiny_chat_model
from mlx_dsv4 import load
from mlx_dsv4.generate import (
    GenerationParameterError,
    PromptCache,
    generate,
    load_prompt_cache,
    save_prompt_cache,
    stream_generate,
)
from mlx_dsv4.speculative import Drafting

PROMPT = "Speculative decoding keeps greedy output"


@pytest.fixture(scope="module")
def plain():
    model, tok = tiny_chat_model()
    return generate(model, tok, PROMPT, max_tokens=40)


def _force(monkeypatch, continuation, n_prompt, seed):
    """The drafter's proposals replaced by the known continuation's next tokens, a random prefix right."""
    rng = random.Random(seed)

    def adjust(tokens, drafts):
        pos = len(tokens) - n_prompt
        right = (continuation[pos : pos + len(drafts)] + [0] * len(drafts))[: len(drafts)]
        n = rng.randint(0, len(drafts))
        return right[:n] + [(t + 1) % 1000 for t in right[n:]]

    monkeypatch.setattr(Drafting, "adjust_drafts", staticmethod(adjust))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_draft_mtp_gives_the_plain_greedy_output(plain, monkeypatch, k):
    model, tok = tiny_chat_model()
    _force(monkeypatch, plain.tokens, len(tok.encode(PROMPT)), k)
    steps = list(stream_generate(model, tok, PROMPT, max_tokens=40, draft="mtp", num_draft=k))
    assert [s.token for s in steps] == plain.tokens
    assert "".join(s.text for s in steps) == plain.text
    assert steps[-1].finish_reason == plain.finish_reason == "length"
    assert [s.logprob for s in steps] == pytest.approx(plain.logprobs, abs=1e-3)
    assert steps[-1].generation_tokens == 40
    assert 0 < steps[-1].draft_accepted <= steps[-1].draft_proposed


def test_draft_mtp_stops_where_plain_decoding_stops(plain, monkeypatch):
    model, tok = tiny_chat_model()
    _force(monkeypatch, plain.tokens, len(tok.encode(PROMPT)), 0)
    eos = plain.tokens[17]
    want = generate(model, tok, PROMPT, max_tokens=40, eos_token_ids=[eos])
    got = generate(model, tok, PROMPT, max_tokens=40, eos_token_ids=[eos], draft="mtp", num_draft=4)
    assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, "stop")
    stop = plain.text[len(plain.text) // 2 :][:3]
    want = generate(model, tok, PROMPT, max_tokens=40, stop=[stop])
    got = generate(model, tok, PROMPT, max_tokens=40, stop=[stop], draft="mtp", num_draft=4)
    assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)


@pytest.mark.parametrize("options, message", [
    (dict(draft="eagle"), r"draft must be one of none, mtp, dspark, got 'eagle'"),
    (dict(draft="mtp", num_draft=0), r"num_draft must be an integer in 1..8, got 0"),
    (dict(draft="mtp", num_draft=9), r"num_draft must be an integer in 1..8, got 9"),
    (dict(draft="mtp", sampler=lambda logprobs: logprobs.argmax(-1)), r"draft 'mtp' samples with the temperature"),
    (dict(draft="mtp", repetition_penalty=1.1), r"draft 'mtp' runs no logits processors"),
])
def test_bad_draft_options_are_named(options, message):
    model, tok = tiny_chat_model()
    with pytest.raises(GenerationParameterError, match=message):
        next(stream_generate(model, tok, PROMPT, max_tokens=4, **options))


def _bits(arrays: dict) -> dict:
    return {name: bytes(memoryview(value.view(mx.uint8))) for name, value in arrays.items()}


@pytest.fixture
def restored_states(monkeypatch):
    """The drafter state (arrays, as bytes) of every Drafting right after a snapshot restores it."""
    states = []
    load = Drafting.load_drafter_state

    def recording(self, arrays, meta, tokens):
        load(self, arrays, meta, tokens)
        states.append(_bits(self.drafter_state()[0]))

    monkeypatch.setattr(Drafting, "load_drafter_state", recording)
    return states


def test_a_drafted_turn_resumes_from_the_prompt_cache(restored_states, tmp_path):
    """A second turn with a draft restores the drafter's state with the main cache, in memory and
    from a file, and gives the tokens of plain greedy decoding from scratch."""
    model, tok = tiny_chat_model()
    pc = PromptCache(model)
    generate(model, tok, PROMPT, max_tokens=12, draft="mtp", num_draft=3, prompt_cache=pc)
    first = max(pc.snapshots, key=lambda s: len(s.tokens))
    assert first.draft is not None and first.draft["drafter"] == "mtp"
    saved = _bits(first.draft["arrays"])
    ids = first.tokens + tok.encode(" And then?")
    plain = generate(model, tok, ids, max_tokens=12)
    path = tmp_path / "turn.safetensors"
    save_prompt_cache(path, pc)

    again = generate(model, tok, ids, max_tokens=12, draft="mtp", num_draft=3, prompt_cache=pc)
    assert again.tokens == plain.tokens
    assert again.stats["cached_tokens"] == len(first.tokens)
    assert restored_states == [saved]

    fresh, _ = load(tiny_chat_dir(), mtp=True)  # as a new process would load it
    from_file = generate(fresh, tok, ids, max_tokens=12, draft="mtp", num_draft=3,
                         prompt_cache=load_prompt_cache(path, fresh))
    assert from_file.tokens == plain.tokens
    assert from_file.stats["cached_tokens"] == len(first.tokens)
    assert restored_states == [saved, saved]


def test_a_restored_prefix_holds_the_drafter_cache_built_from_scratch(restored_states, tmp_path):
    model, tok = tiny_chat_model()
    ids = tok.encode(PROMPT)
    scratch = Drafting(model, model.make_cache())
    scratch.extend(ids, 0, len(ids) - 1)  # the prompt's snapshot is taken before its last token
    expected = _bits(scratch.drafter_state()[0])
    pc = PromptCache(model)
    generate(model, tok, ids, max_tokens=6, draft="mtp", prompt_cache=pc)
    path = tmp_path / "prefix.safetensors"
    save_prompt_cache(path, pc)
    other = ids + tok.encode(" is the question")  # extends the prompt's snapshot, not the reply's
    want = generate(model, tok, other, max_tokens=8)
    assert generate(model, tok, other, max_tokens=8, draft="mtp", prompt_cache=pc).tokens == want.tokens
    assert generate(model, tok, other, max_tokens=8, draft="mtp",
                    prompt_cache=load_prompt_cache(path, model)).tokens == want.tokens
    assert restored_states == [expected, expected]


def test_a_snapshot_without_drafter_state_is_run_again(restored_states):
    """A plain generation's snapshot holds no drafter state: a drafted one runs the prompt from
    its start (and leaves snapshots that have it); a plain one uses a drafted one's snapshot."""
    model, tok = tiny_chat_model()
    pc = PromptCache(model)
    generate(model, tok, PROMPT, max_tokens=6, prompt_cache=pc)
    assert all(s.draft is None for s in pc.snapshots)
    ids = pc.tokens + tok.encode(" More.")
    want = generate(model, tok, ids, max_tokens=8)
    got = generate(model, tok, ids, max_tokens=8, draft="mtp", prompt_cache=pc)
    assert got.tokens == want.tokens and got.stats["cached_tokens"] == 0
    assert restored_states == []
    drafted = max(pc.snapshots, key=lambda s: len(s.tokens))
    assert drafted.draft is not None
    more = drafted.tokens + tok.encode(" Go on.")
    plain = generate(model, tok, more, max_tokens=8, prompt_cache=pc)
    assert plain.stats["cached_tokens"] == len(drafted.tokens)
    assert plain.tokens == generate(model, tok, more, max_tokens=8).tokens


def test_draft_mtp_needs_a_checkpoint_with_an_mtp_layer():
    from generate_support import tiny_chat_dir
    from mlx_dsv4.loader import load_model

    _, tok = tiny_chat_model()
    model = load_model(tiny_chat_dir(), mtp=False)
    with pytest.raises(GenerationParameterError, match=r"draft 'mtp' needs an MTP layer \(mtp.\* tensors\)"):
        next(stream_generate(model, tok, PROMPT, max_tokens=4, draft="mtp"))


def test_draft_mtp_prefills_in_chunks_and_reports_progress(plain):
    model, tok = tiny_chat_model()
    calls = []
    got = generate(model, tok, PROMPT, max_tokens=40, draft="mtp", num_draft=2, prefill_step=3,
                   progress=lambda done, total: calls.append((done, total)))
    n = len(tok.encode(PROMPT))
    assert got.tokens == plain.tokens
    assert calls == [(min(b, n), n) for b in range(3, n + 3, 3)]


def test_switching_speculation_off_and_on_keeps_the_plain_greedy_output(plain, monkeypatch):
    """Whatever the switch decides round by round, the output is plain greedy decoding's."""
    import mlx_dsv4.generate as generate_module
    from mlx_dsv4.speculative import DraftSwitch

    ways = []

    class Alternating(DraftSwitch):
        def speculate(self):
            ways.append(len(ways) % 3 != 1)  # speculative, plain, speculative, ...
            return ways[-1]

    monkeypatch.setattr(generate_module, "DraftSwitch", Alternating)
    model, tok = tiny_chat_model()
    _force(monkeypatch, plain.tokens, len(tok.encode(PROMPT)), 5)
    got = generate(model, tok, PROMPT, max_tokens=40, draft="mtp", num_draft=3)
    assert got.tokens == plain.tokens and got.text == plain.text
    assert got.logprobs == pytest.approx(plain.logprobs, abs=1e-3)
    assert True in ways and False in ways
    assert 0 < got.stats["draft_accepted"] <= got.stats["draft_proposed"]


def test_damaged_drafter_state_in_a_file_is_named(tmp_path):
    import json

    from mlx_dsv4.generate import PromptCacheError, _arrays_checksum

    model, tok = tiny_chat_model()
    pc = PromptCache(model)
    generate(model, tok, PROMPT, max_tokens=4, draft="mtp", prompt_cache=pc)
    path = tmp_path / "drafted.safetensors"
    save_prompt_cache(path, pc)
    arrays, header = mx.load(str(path), format="safetensors", return_metadata=True)
    n_tokens = json.loads(header["snapshots"])[0]["n_tokens"]

    def refused(arrays, match, **draft_changes):
        index = json.loads(header["snapshots"])
        for key, value in draft_changes.items():
            if value is None:
                del index[0][key]
            elif key == "offset":
                index[0]["draft"]["meta"]["offset"] = value
            else:
                index[0]["draft"][key] = value
        edited = tmp_path / "edited.safetensors"
        mx.save_safetensors(str(edited), arrays, metadata=dict(header, snapshots=json.dumps(index),
                                                                checksum=_arrays_checksum(arrays)))
        with pytest.raises(PromptCacheError, match=match) as caught:
            load_prompt_cache(edited, model)
        assert str(caught.value).startswith(f"{edited}: snapshot 0")

    without_hidden = {k: v for k, v in arrays.items() if k != "0.draft.last_hidden"}
    refused(without_hidden, r"drafter 'mtp': array 'draft.last_hidden' is missing")
    refused(dict(arrays, **{"0.draft.last_hidden": mx.zeros((1, 2, 3))}),
            r"array 'draft.last_hidden' has shape \(1, 2, 3\)")
    refused(arrays, r"drafter 'eagle': not a drafter", drafter="eagle")
    refused(arrays, r"draft: expected an object with the text fields drafter and fingerprint", fingerprint=7)
    refused(arrays, rf"its cache holds {n_tokens} tokens, expected {n_tokens - 1}", offset=str(n_tokens))
    refused(arrays, r"unexpected array 'draft.cache.layers.0.ring.0': the header lists no drafter state", draft=None)
    # a drafter of other weights: the snapshot stays, without the drafter state
    edited = tmp_path / "other-drafter.safetensors"
    index = json.loads(header["snapshots"])
    for entry in index:
        entry["draft"]["fingerprint"] = "0" * 32
    mx.save_safetensors(str(edited), arrays, metadata=dict(header, snapshots=json.dumps(index)))
    assert [s.draft for s in load_prompt_cache(edited, model).snapshots] == [None] * len(index)
