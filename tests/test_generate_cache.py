"""Prompt caches: reuse across turns, files, and the errors for caches that do not fit."""

import dataclasses
import json

import mlx.core as mx
import mlx.nn as nn
import pytest

from generate_support import tiny_chat_dir, tiny_chat_model
from mlx_dsv4.generate import (
    PromptCache,
    PromptCacheError,
    _arrays_checksum,
    generate,
    load_prompt_cache,
    save_prompt_cache,
    stream_generate,
)
from mlx_dsv4.loader import load_model
from mlx_dsv4.model import Model

SYSTEM = "<｜begin▁of▁sentence｜>" + "You are a storyteller who only writes about animals. " * 12


@pytest.fixture(scope="module")
def mt():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def first_turn(mt):
    """A prompt long enough to close ratio-4 windows and one ratio-128 window."""
    _, tok = mt
    ids = tok.encode(SYSTEM + "<｜User｜>Write about a heron.<｜Assistant｜></think>")
    assert len(ids) > 130
    return ids


def test_multi_turn_prefills_only_the_new_tokens(mt, first_turn):
    model, tok = mt
    pc = PromptCache(model)
    one = generate(model, tok, first_turn, max_tokens=6, prompt_cache=pc)
    assert one.stats["cached_tokens"] == 0
    new = tok.encode("<｜end▁of▁sentence｜><｜User｜>And a crane?<｜Assistant｜></think>")
    second_prompt = first_turn + one.tokens + new
    two = generate(model, tok, second_prompt, max_tokens=6, prompt_cache=pc)
    assert two.stats["cached_tokens"] == len(first_turn) + len(one.tokens)
    assert two.stats["prompt_tokens"] - two.stats["cached_tokens"] == len(new)
    assert two.tokens == generate(model, tok, second_prompt, max_tokens=6).tokens
    # a third turn extends the second
    third_prompt = second_prompt + two.tokens + new
    three = generate(model, tok, third_prompt, max_tokens=4, prompt_cache=pc)
    assert three.stats["cached_tokens"] == len(second_prompt) + len(two.tokens)
    assert three.tokens == generate(model, tok, third_prompt, max_tokens=4).tokens


def test_diverging_turn_reuses_the_prompt_snapshot(mt, first_turn):
    """Thinking-mode history drops the reasoning: the next prompt diverges right after the
    previous prompt's last token, so the snapshot taken before that token is the match."""
    model, tok = mt
    pc = PromptCache(model)
    generate(model, tok, first_turn, max_tokens=4, prompt_cache=pc)
    other = first_turn[:-1] + tok.encode("<think>Hmm.</think>Fine.<｜end▁of▁sentence｜><｜User｜>More<｜Assistant｜>")
    result = generate(model, tok, other, max_tokens=4, prompt_cache=pc)
    assert result.stats["cached_tokens"] == len(first_turn) - 1
    assert result.tokens == generate(model, tok, other, max_tokens=4).tokens


def test_unrelated_prompt_is_recomputed_in_memory(mt, first_turn):
    model, tok = mt
    pc = PromptCache(model)
    generate(model, tok, first_turn, max_tokens=2, prompt_cache=pc)
    unrelated = tok.encode("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>")
    result = generate(model, tok, unrelated, max_tokens=3, prompt_cache=pc)
    assert result.stats["cached_tokens"] == 0  # no snapshot is a prefix of it
    assert result.tokens == generate(model, tok, unrelated, max_tokens=3).tokens


def test_same_prompt_twice_prefills_one_token(mt, first_turn):
    model, tok = mt
    pc = PromptCache(model)
    a = generate(model, tok, first_turn, max_tokens=5, prompt_cache=pc)
    b = generate(model, tok, first_turn, max_tokens=5, prompt_cache=pc)
    assert b.stats["cached_tokens"] == len(first_turn) - 1
    assert a.tokens == b.tokens


def test_restored_file_gives_the_same_tokens_as_uninterrupted_generation(mt, first_turn, tmp_path):
    model, tok = mt
    continuation = tok.encode("<｜end▁of▁sentence｜><｜User｜>Now a story about an otter.<｜Assistant｜></think>")
    uninterrupted = generate(model, tok, first_turn + continuation, max_tokens=8)

    pc = PromptCache(model)
    generate(model, tok, first_turn, max_tokens=3, prompt_cache=pc)
    path = tmp_path / "turn.cache"
    save_prompt_cache(path, pc)
    assert path.is_file()

    fresh_model = load_model(tiny_chat_dir())  # a new process would load the model again
    restored = load_prompt_cache(path, fresh_model)
    result = generate(fresh_model, tok, first_turn + continuation, max_tokens=8, prompt_cache=restored)
    assert result.stats["cached_tokens"] == len(first_turn) - 1
    assert result.tokens == uninterrupted.tokens


def test_snapshot_at_a_shared_system_prefix(mt, tmp_path):
    model, tok = mt
    system = tok.encode(SYSTEM)
    q1 = system + tok.encode("<｜User｜>Write about a heron.<｜Assistant｜></think>")
    q2 = system + tok.encode("<｜User｜>Write about a mole.<｜Assistant｜></think>")
    pc = PromptCache(model)
    generate(model, tok, q1, max_tokens=2, prompt_cache=pc, snapshot_at=[len(system)], prefill_step=64)
    save_prompt_cache(tmp_path / "system.cache", pc)
    restored = load_prompt_cache(tmp_path / "system.cache", model)
    result = generate(model, tok, q2, max_tokens=6, prompt_cache=restored)
    assert result.stats["cached_tokens"] == len(system)
    assert result.tokens == generate(model, tok, q2, max_tokens=6).tokens


def test_encode_keeps_the_models_own_tokens(mt, first_turn):
    model, tok = mt
    pc = PromptCache(model)
    reply = generate(model, tok, first_turn, max_tokens=6, prompt_cache=pc)
    history_text = tok.decode(first_turn + reply.tokens)
    follow_up = "<｜end▁of▁sentence｜><｜User｜>Again<｜Assistant｜></think>"
    ids = pc.encode(history_text + follow_up, tok)
    assert ids == first_turn + reply.tokens + tok.encode(follow_up)
    assert pc.encode("<｜begin▁of▁sentence｜>unrelated", tok) == tok.encode("<｜begin▁of▁sentence｜>unrelated")


def test_file_from_another_model_is_rejected(mt, first_turn, tmp_path):
    model, tok = mt
    pc = PromptCache(model)
    generate(model, tok, first_turn, max_tokens=2, prompt_cache=pc)
    save_prompt_cache(tmp_path / "a.cache", pc)

    other = load_model(tiny_chat_dir())
    other.norm.weight = other.norm.weight * 1.5  # same architecture, different weights
    with pytest.raises(PromptCacheError, match="different model"):
        load_prompt_cache(tmp_path / "a.cache", other)

    quantised = load_model(tiny_chat_dir())  # same weights, another storage format
    nn.quantize(quantised, class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0)
    with pytest.raises(PromptCacheError, match="different model"):
        load_prompt_cache(tmp_path / "a.cache", quantised)

    args = dataclasses.replace(model.args, compress_ratios=[0, 128, 4])
    with pytest.raises(PromptCacheError, match="different model"):
        load_prompt_cache(tmp_path / "a.cache", Model(args))

    # an in-memory cache is bound to its model as well
    with pytest.raises(PromptCacheError, match="different model"):
        generate(other, tok, first_turn, max_tokens=1, prompt_cache=pc)


def test_file_with_a_different_prefix_is_rejected(mt, first_turn, tmp_path):
    model, tok = mt
    pc = PromptCache(model)
    generate(model, tok, first_turn, max_tokens=2, prompt_cache=pc)
    save_prompt_cache(tmp_path / "p.cache", pc)
    restored = load_prompt_cache(tmp_path / "p.cache", model)
    diverging = first_turn[:20] + tok.encode(" something else entirely<｜Assistant｜></think>")
    with pytest.raises(PromptCacheError, match="differs at token 20"):
        generate(model, tok, diverging, max_tokens=2, prompt_cache=restored)


def test_not_a_prompt_cache_file(mt, tmp_path):
    model, _ = mt
    bogus = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(bogus), {"x": mx.zeros((2,))})
    with pytest.raises(PromptCacheError, match="not an mlx-dsv4 prompt cache"):
        load_prompt_cache(bogus, model)
    (tmp_path / "garbage.cache").write_bytes(b"not safetensors at all")
    with pytest.raises(PromptCacheError, match="not a readable"):
        load_prompt_cache(tmp_path / "garbage.cache", model)
    with pytest.raises(PromptCacheError, match="no such"):
        load_prompt_cache(tmp_path / "missing.cache", model)
    with pytest.raises(PromptCacheError, match="empty"):
        save_prompt_cache(tmp_path / "empty.cache", PromptCache(model))


def test_text_prompts_extend_the_cached_history(mt, first_turn):
    model, tok = mt
    pc = PromptCache(model)
    first_text = tok.decode(first_turn)
    reply = generate(model, tok, first_text, max_tokens=6, prompt_cache=pc)
    follow_up = "<｜end▁of▁sentence｜><｜User｜>Again<｜Assistant｜></think>"
    second = generate(model, tok, first_text + reply.text + follow_up, max_tokens=4, prompt_cache=pc)
    assert second.stats["cached_tokens"] == len(first_turn) + len(reply.tokens)
    assert second.stats["prompt_tokens"] == second.stats["cached_tokens"] + len(tok.encode(follow_up))


def test_closing_the_stream_early_keeps_the_decoded_tokens(mt, first_turn):
    model, tok = mt
    pc = PromptCache(model)
    steps = stream_generate(model, tok, first_turn, max_tokens=50, prompt_cache=pc)
    taken = [next(steps).token for _ in range(3)]
    steps.close()
    extra = tok.encode("<｜User｜>Go on<｜Assistant｜></think>")
    result = generate(model, tok, first_turn + taken + extra, max_tokens=4, prompt_cache=pc)
    assert result.stats["cached_tokens"] == len(first_turn) + len(taken)
    assert result.tokens == generate(model, tok, first_turn + taken + extra, max_tokens=4).tokens


def test_interrupted_prefill_resumes_where_it_stopped(mt, first_turn):
    model, tok = mt
    pc = PromptCache(model)

    def stop_after_two_chunks(done, total):
        if done >= 32:
            raise KeyboardInterrupt

    steps = list(stream_generate(model, tok, first_turn, max_tokens=4, prefill_step=16, prompt_cache=pc,
                                 progress=stop_after_two_chunks))
    assert [s.finish_reason for s in steps] == ["interrupted"]
    resumed = generate(model, tok, first_turn, max_tokens=4, prompt_cache=pc)
    assert resumed.stats["cached_tokens"] == 32
    assert resumed.tokens == generate(model, tok, first_turn, max_tokens=4).tokens


# -- damaged and foreign files -------------------------------------------------------


@pytest.fixture(scope="module")
def saved(mt, first_turn, tmp_path_factory):
    """(path of a valid file, its arrays, its header) for a cache of `first_turn`."""
    model, tok = mt
    pc = PromptCache(model)
    generate(model, tok, first_turn, max_tokens=3, prompt_cache=pc)
    path = tmp_path_factory.mktemp("saved") / "turn.cache"
    save_prompt_cache(path, pc)
    arrays, header = mx.load(str(path), format="safetensors", return_metadata=True)
    return path, arrays, header


def rewrite(tmp_path, arrays, header, *, resign=False):
    """A file with `arrays` and the header fields `header`; resign: with the checksum of the
    new arrays, so that only their layout is wrong."""
    header = dict(header)
    if resign:
        header["checksum"] = _arrays_checksum(arrays)
    path = tmp_path / "edited.safetensors"
    mx.save_safetensors(str(path), arrays, metadata=header)
    return path


def refused(path, model, match):
    with pytest.raises(PromptCacheError, match=match) as caught:
        load_prompt_cache(path, model)
    assert str(caught.value).startswith(f"{path}: ")


def with_snapshot_field(header, i, **changes):
    index = json.loads(header["snapshots"])
    for key, value in changes.items():
        if key in index[i]["meta"]:
            index[i]["meta"][key] = value
        else:
            index[i][key] = value
    return dict(header, snapshots=json.dumps(index))


def test_a_file_without_a_fingerprint_is_refused(mt, saved, tmp_path):
    model, _ = mt
    path, arrays, header = saved
    refused(rewrite(tmp_path, arrays, dict(header, fingerprint="")), model, "names no model fingerprint")
    refused(rewrite(tmp_path, arrays, {k: v for k, v in header.items() if k != "fingerprint"}), model,
            "names no model fingerprint")
    refused(rewrite(tmp_path, arrays, dict(header, fingerprint="0" * 32)), model, "different model")


def test_damaged_header_fields_are_named(mt, saved, tmp_path):
    model, _ = mt
    path, arrays, header = saved
    refused(rewrite(tmp_path, arrays, dict(header, metadata="{not json")), model,
            "header field 'metadata' is not valid JSON")
    refused(rewrite(tmp_path, arrays, dict(header, snapshots="[" * 100000)), model,
            "header field 'snapshots' is not valid JSON")
    refused(rewrite(tmp_path, arrays, dict(header, snapshots='{"n_tokens": 3}')), model, "must hold a JSON list")
    refused(rewrite(tmp_path, arrays, dict(header, snapshots="[]")), model, "holds no snapshots")
    fewer = json.dumps(json.loads(header["snapshots"])[:-1])
    refused(rewrite(tmp_path, arrays, dict(header, snapshots=fewer)), model, r"unexpected array '1\.")
    refused(rewrite(tmp_path, arrays, dict(header, format="mlx-dsv4-prompt-cache/1")), model,
            "written in format 'mlx-dsv4-prompt-cache/1'.*delete it")
    n_tokens = json.loads(header["snapshots"])[0]["n_tokens"]
    for changes, match in [
        (dict(offset="-1"), "'offset' must be a token count"),
        (dict(offset="1e3"), "'offset' must be a token count"),
        (dict(offset=7), "'offset' must be a string"),
        (dict(offset=str(n_tokens + 1)), "array layers.1.compressor.pending_kv has shape"),
        (dict(ratios="0,4"), "layer schedule"),
        (dict(kv_dtype="bf16"), "kv_dtype='bf16'"),
        (dict(n_tokens=5), r"__tokens__ has shape"),
        (dict(n_tokens="40"), "n_tokens must be a token count"),
        (dict(meta=[]), "metadata must be an object"),
        (dict(extra=1), "expected an object with the fields n_tokens and meta"),
    ]:
        refused(rewrite(tmp_path, arrays, with_snapshot_field(header, 0, **changes)), model, match)


def test_arrays_of_the_wrong_layout_are_named(mt, saved, tmp_path):
    model, _ = mt
    path, arrays, header = saved
    name = "0.layers.1.compressor.entries.0"
    for edited, match in [
        (dict(arrays, **{name: arrays[name][:, :-1]}), f"array {name[2:]} has shape"),
        (dict(arrays, **{name: arrays[name].astype(mx.float32)}), f"array {name[2:]} has shape .* dtype"),
        ({k: v for k, v in arrays.items() if k != name}, f"array {name[2:]} is missing"),
        (dict(arrays, **{"0.layers.0.compressor.pending_kv": mx.zeros((1, 1, 64))}),
         "unexpected array layers.0.compressor.pending_kv"),
        (dict(arrays, **{"5.layers.0.ring.0": arrays["0.layers.0.ring.0"]}), "unexpected array '5.layers.0.ring.0'"),
        (dict(arrays, **{"0.__tokens__": arrays["0.__tokens__"] + 10**7}), "outside the vocabulary"),
        (dict(arrays, **{"0.__tokens__": arrays["0.__tokens__"][:-1]}), "__tokens__ has shape"),
    ]:
        refused(rewrite(tmp_path, edited, header, resign=True), model, match)
        refused(rewrite(tmp_path, edited, header), model, "do not match the checksum")


def test_truncated_and_flipped_files_are_refused(mt, saved, tmp_path):
    model, _ = mt
    path, _, _ = saved
    data = path.read_bytes()
    damaged = tmp_path / "damaged.cache"
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        damaged.write_bytes(data[:cut])
        refused(damaged, model, "not a readable safetensors file")
    flipped = bytearray(data)
    flipped[-1000] ^= 0x10  # inside the array data
    damaged.write_bytes(bytes(flipped))
    refused(damaged, model, "do not match the checksum")
    refused(tmp_path, model, "not a file")


def test_saving_into_a_missing_folder_names_it_and_leaves_nothing(mt, saved, tmp_path):
    model, _ = mt
    path, _, _ = saved
    pc = load_prompt_cache(path, model)
    target = tmp_path / "missing" / "turn.cache"
    with pytest.raises(PromptCacheError, match=f"{target}: cannot write .*folder {target.parent} does not exist"):
        save_prompt_cache(target, pc)
    with pytest.raises(PromptCacheError, match=f"{tmp_path}: cannot write"):
        save_prompt_cache(tmp_path, pc)  # a folder
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    save_prompt_cache(tmp_path / "turn.cache", pc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turn.cache"]


@pytest.mark.parametrize("kv_dtype,index_dtype,naive", [("fp8", "fp4", False), ("bf16", "fp8", False),
                                                         ("float", "bf16", True)])
def test_layout_is_what_to_state_holds(mt, kv_dtype, index_dtype, naive):
    model, _ = mt
    cache = model.make_cache(kv_dtype, index_dtype, naive=naive)
    offset = 0
    for chunk in (1, 2, 1, 5, 120, 1, 3, 130):
        model(mx.array([[7] * chunk]), cache=cache)
        offset += chunk
        arrays, meta = cache.to_state()
        assert {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()} == cache.layout(offset)
        assert cache.check_state(arrays, meta) == offset


def test_a_quantised_embedding_keeps_its_files_loadable(mt, first_turn, tmp_path):
    """A float32 model whose embedding is quantised computes in float32 (the scales' dtype),
    which its cache files hold: they load and continue as the uncached run does."""
    _, tok = mt
    model = load_model(tiny_chat_dir())
    nn.quantize(model, class_predicate=lambda _, m: isinstance(m, (nn.Linear, nn.Embedding))
                and m.weight.shape[-1] % 64 == 0)
    assert model.dtype == mx.bfloat16
    pc = PromptCache(model)
    generate(model, tok, first_turn, max_tokens=3, prompt_cache=pc)
    save_prompt_cache(tmp_path / "q.cache", pc)
    restored = load_prompt_cache(tmp_path / "q.cache", model)
    extended = first_turn + tok.encode("<｜User｜>More<｜Assistant｜></think>")
    result = generate(model, tok, extended, max_tokens=4, prompt_cache=restored)
    assert result.stats["cached_tokens"] == len(first_turn) - 1
    assert result.tokens == generate(model, tok, extended, max_tokens=4).tokens
