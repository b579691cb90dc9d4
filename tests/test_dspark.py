"""The DSpark drafter (V4-Flash-0731) on tiny checkpoints: its proposals, exact greedy and sampled
speculative decoding with it, its cache, its checkpoint contract and the errors that name bad input."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest

from generate_support import forced_drafts
from mlx_dsv4.config import ConfigError, ModelArgs
from mlx_dsv4.generate import GenerationParameterError, check_draft
from mlx_dsv4.hc import expand
from mlx_dsv4.loader import CheckpointError, load_model
from mlx_dsv4.speculative import DSparkDrafting, Drafting, sampling_distribution
from mlx_dsv4.tiny import dspark_config, tiny_config, write_tiny_checkpoint

PROMPT = list(range(10, 40))
N_GENERATED = 300  # crosses the 128-token compression and sliding-window boundaries
VOCAB = 1024


@pytest.fixture(scope="module", params=["flash", "pro"])
def tiny(request, tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), preset=request.param, dspark=True,
                                 vocab_size=VOCAB)
    return path, load_model(path, check_memory=False, mtp=True)


def test_dspark_checkpoint_loads_its_drafter_in_place_of_mtp_layers(tiny):
    path, model = tiny
    config = json.loads((path / "config.json").read_text())
    assert model.mtp_layers == () and model.dspark is not None
    assert len(model.dspark.mtp) == config["num_nextn_predict_layers"] == 2
    assert model.dspark.tap_layers == tuple(config["dspark_target_layer_ids"])
    assert model.dspark.mtp[0].main_proj.weight.shape == (64, 64 * len(config["dspark_target_layer_ids"]))
    assert model.dspark.mtp[-1].markov_head.markov_w1.weight.shape == (VOCAB, config["dspark_markov_rank"])


def _plain(model, n, keep_from):
    """Plain greedy decoding of n tokens: (tokens, the drafter's taps of every position run, the
    cache's state after each of the generated tokens keep_from.. was run)."""
    cache = model.make_cache()
    taps_of = model.dspark.tap_layers
    logits, taps = model(mx.array([PROMPT]), cache, return_hidden=True, tap_layers=taps_of)
    out, all_taps, states = [int(mx.argmax(logits[0, -1]).item())], [taps], {}
    while len(out) < n:
        logits, taps = model(mx.array([[out[-1]]]), cache, return_hidden=True, tap_layers=taps_of)
        all_taps.append(taps)
        out.append(int(mx.argmax(logits[0, -1]).item()))
        if len(out) - 1 >= keep_from:
            states[len(out) - 1] = cache.to_state()
    return out, mx.concatenate(all_taps, axis=1), states


def test_taps_are_layer_outputs_averaged_over_the_hc_streams(tiny):
    """The drafter reads the named decoder layers' outputs (mean of the hc streams), in layer order."""
    _, model = tiny
    tokens = mx.array([PROMPT[:9]])
    _, taps = model(tokens, model.make_cache("float", "float"), return_hidden=True, tap_layers=(3, 1))
    cache = model.make_cache("float", "float")
    x = model.embed(tokens)
    h = expand(x, model.args.hc_mult)
    outputs = []
    for layer, layer_cache in zip(model.layers, cache.layers):
        h = layer(h, tokens, layer_cache, cache.query_block)
        outputs.append(np.array(h).mean(axis=2))
    np.testing.assert_allclose(np.array(taps), np.concatenate([outputs[1], outputs[3]], axis=-1), rtol=1e-5,
                               atol=1e-5)


def test_greedy_drafts_are_the_argmax_chain_through_the_markov_head(tiny):
    _, model = tiny
    drafter = model.dspark
    drafting = DSparkDrafting(model, model.make_cache())
    drafting.prefill(PROMPT, 16)
    anchor = 77
    drafts, rows = drafter.propose(anchor, 4, model.embed, model.head, drafting.draft_cache)
    assert rows is None and len(drafts) == 4
    noise = model.args.dspark_noise_token_id
    base = np.array(drafter.block_logits(mx.array([[anchor, noise, noise, noise]]), model.embed, model.head,
                                         drafting.draft_cache)[0])
    markov = drafter.mtp[-1].markov_head
    w1, w2 = np.array(markov.markov_w1.weight), np.array(markov.markov_w2.weight)
    previous, expected = anchor, []
    for i in range(4):
        previous = int(np.argmax(base[i] + w2 @ w1[previous]))
        expected.append(previous)
    assert drafts == expected
    # one pass, no causal mask: a later block token changes the first position's logits
    other = np.array(drafter.block_logits(mx.array([[anchor, noise, noise, 5]]), model.embed, model.head,
                                          drafting.draft_cache)[0])
    assert np.abs(other[0] - base[0]).max() > 1e-4
    with pytest.raises(ValueError, match=r"proposes 1..4 tokens per pass \(dspark_block_size\), asked for 5"):
        drafter.propose(anchor, 5, model.embed, model.head, drafting.draft_cache)


def _forced(continuation, rng):
    return forced_drafts(continuation, len(PROMPT), VOCAB, rng)


def test_speculative_equals_plain_greedy_and_leaves_plain_caches(tiny):
    """One generation whose rounds draft k = 1, 2, 3, 4 in turn, with a plain step every fifth
    time: the tokens of plain greedy decoding, and both caches as plain decoding leaves them."""
    _, model = tiny
    expected, plain_taps, plain_states = _plain(model, N_GENERATED + 8, N_GENERATED - 1)
    drafting = DSparkDrafting(model, model.make_cache())
    drafting.adjust_drafts, rounds = _forced(expected, random.Random(1))
    out = [int(mx.argmax(drafting.prefill(PROMPT, 16)).item())]
    i, ks = 0, []
    while len(out) < N_GENERATED:
        if i % 5 == 4:
            out += [t for t, _ in drafting.plain_step(out[-1])]
        else:
            ks.append(1 + len(ks) % 4)
            out += [t for t, _ in drafting.round(out[-1], ks[-1])]
        i += 1
    n = len(out)
    assert out == expected[:n]
    assert drafting.accepted == sum(rounds) and drafting.proposed == sum(ks)
    # main cache: the next token's logits as from a cache plain decoding built
    ref_cache = model.make_cache()
    ref_cache.load_state(*plain_states[n - 1])
    assert drafting.cache.offset == ref_cache.offset == len(PROMPT) + n - 1
    got = model(mx.array([[out[-1]]]), drafting.cache)
    want = model(mx.array([[out[-1]]]), ref_cache)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3, atol=1e-3)
    # drafter cache: it read plain decoding's taps of every position run
    drafter = model.dspark
    ref_draft = drafter.make_cache(drafting.cache.kv_dtype, drafting.cache.index_dtype, dtype=model.dtype)
    drafter.read(plain_taps[:, : len(PROMPT) + n - 1], ref_draft)
    assert drafting.draft_cache.offset == ref_draft.offset == len(PROMPT) + n - 1
    block = mx.array([[out[-1]] + [model.args.dspark_noise_token_id] * 3])
    got = drafter.block_logits(block, model.embed, model.head, drafting.draft_cache)
    want = drafter.block_logits(block, model.embed, model.head, ref_draft)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3, atol=1e-3)


def test_drafter_cache_state_round_trips_exactly(tiny):
    _, model = tiny
    drafting = DSparkDrafting(model, model.make_cache())
    drafting.prefill(list(range(3, 140)), 64)  # past the sliding window
    arrays, meta = drafting.draft_cache.to_state()
    block = mx.array([[9, 8, 7]])
    before = np.array(model.dspark.block_logits(block, model.embed, model.head, drafting.draft_cache))
    drafting.plain_step(11)
    drafting.plain_step(12)
    moved = np.array(model.dspark.block_logits(block, model.embed, model.head, drafting.draft_cache))
    drafting.draft_cache.load_state(arrays, meta)
    after = np.array(model.dspark.block_logits(block, model.embed, model.head, drafting.draft_cache))
    assert np.abs(moved - before).max() > 1e-4
    np.testing.assert_array_equal(after, before)


# chi-square critical value at significance 0.001, 15 degrees of freedom
CRITICAL_15 = 37.697


def test_speculative_sampling_gives_the_distribution_of_plain_sampling(tmp_path):
    """On a 16-token vocabulary, where the drafter's distributions overlap the model's and drafts
    are often accepted: the first token a round emits has the model's next-token distribution."""
    path = write_tiny_checkpoint(tmp_path / "v16", dspark=True, vocab_size=16, compress_ratios=[0, 4, 128],
                                 num_hash_layers=1)
    model = load_model(path, check_memory=False, mtp=True)
    prompt, anchor = [3, 1, 4, 1, 5, 9, 2, 6], 5
    distribution = sampling_distribution(1.0)
    p = np.array(distribution(model(mx.array([prompt + [anchor]]), model.make_cache())[0, -1]))
    drafting = DSparkDrafting(model, model.make_cache(), distribution=distribution)
    drafting.prefill(prompt, 2048)
    start = (drafting.cache.to_state(), drafting.draft_cache.to_state(), list(drafting.tokens))
    mx.random.seed(3)
    counts, runs = np.zeros(16), 200
    for _ in range(runs):
        drafting.cache.load_state(*start[0])
        drafting.draft_cache.load_state(*start[1])
        drafting.tokens = list(start[2])
        counts[drafting.round(anchor, 2)[0][0]] += 1
    expected = p * runs
    stat = float(((counts - expected) ** 2 / expected).sum())
    print(f"\nfirst token over {runs} rounds: chi-square {stat:.1f} (df 15), "
          f"{drafting.accepted} of {drafting.proposed} drafts accepted")
    assert stat < CRITICAL_15
    assert 0.1 * runs < drafting.accepted < 1.9 * runs  # both acceptance and rejection were taken
    # the test can tell: the drafter's own first-draft distribution is far off
    drafting.draft_cache.load_state(*start[1])
    q = np.array(model.dspark.propose(anchor, 1, model.embed, model.head, drafting.draft_cache, distribution)[1][0])
    assert float(((counts - q * runs) ** 2 / np.maximum(q * runs, 1e-9)).sum()) > 3 * CRITICAL_15


@pytest.fixture(scope="module")
def chat_dspark(tmp_path_factory):
    """A DSpark checkpoint with the real vocabulary (three decoder layers), for generate, written by
    `mlx-dsv4 make-tiny --dspark`."""
    from mlx_dsv4.cli import main

    path = tmp_path_factory.mktemp("chat-dspark") / "tiny"
    assert main(["make-tiny", str(path), "--dspark", "--layers", "0,4,128"]) == 0
    config = json.loads((path / "config.json").read_text())
    assert config["dspark_block_size"] == 4 and config["dspark_target_layer_ids"] == [1, 2]
    return path


def test_generate_with_draft_dspark_gives_the_plain_greedy_output(chat_dspark, capsys):
    from mlx_dsv4.cli import main

    common = ["generate", "--model", str(chat_dspark), "--prompt", "Name a bird.", "--max-tokens", "10", "--json"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(common + ["--draft", "dspark", "--num-draft", "3"]) == 0
    drafted = json.loads(capsys.readouterr().out)
    draft = drafted.pop("draft")
    for reply in (plain, drafted):
        reply["usage"] = {k: v for k, v in reply["usage"].items() if k.endswith("tokens")}
    assert drafted == plain
    assert draft["drafter"] == "dspark" and draft["num_draft"] == 3 and draft["proposed"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--draft", "mtp"], "--draft 'mtp' needs an MTP layer, but this checkpoint's mtp.* tensors are a DSpark "
                         "drafter: use --draft dspark"),
    (["--draft", "dspark", "--num-draft", "5"], "--num-draft must be at most 4 with the DSpark drafter (its "
                                                "dspark_block_size), got 5"),
])
def test_draft_mismatches_on_a_dspark_checkpoint_are_named(chat_dspark, capsys, flags, message):
    from mlx_dsv4.cli import main

    assert main(["generate", "--model", str(chat_dspark), "--prompt", "Hi", *flags]) == 1
    assert f"error: {chat_dspark}: {message}" in capsys.readouterr().err


def test_draft_dspark_needs_a_dspark_drafter(tiny):
    from generate_support import tiny_chat_model

    model, _ = tiny_chat_model()
    with pytest.raises(GenerationParameterError, match=r"'dspark' needs a DSpark drafter \(dspark_\* keys in "
                                                       r"config.json and mtp.\* stages\)"):
        check_draft(model, "dspark", 3)
    with pytest.raises(ValueError, match="no DSpark drafter"):
        DSparkDrafting(model, model.make_cache())
    with pytest.raises(ValueError, match="no MTP layer"):
        Drafting(tiny[1], tiny[1].make_cache())


@pytest.mark.parametrize("change, message", [
    (dict(dspark_target_layer_ids=[1, 6]), r"`dspark_target_layer_ids\[1\]` = 6: must be a decoder layer index "
                                           r"in \[0, 5\]"),
    (dict(dspark_target_layer_ids=[2, 2]), r"`dspark_target_layer_ids` = \[2, 2\]: lists a layer more than once"),
    (dict(dspark_target_layer_ids=[]), r"`dspark_target_layer_ids` = \[\]: must be a non-empty list"),
    (dict(dspark_block_size=0), r"`dspark_block_size` = 0: must be an integer in \[1, 64\]"),
    (dict(dspark_noise_token_id=VOCAB), rf"`dspark_noise_token_id` = {VOCAB}: must be an integer in \[0, {VOCAB - 1}\]"),
    (dict(dspark_block_size=None), r"`dspark_target_layer_ids` = .*: a DSpark drafter also needs `dspark_block_size`"),
])
def test_bad_dspark_config_values_are_named(change, message):
    cfg = tiny_config("flash", vocab_size=VOCAB, **dspark_config(6, VOCAB))
    cfg.update(change)
    if cfg["dspark_block_size"] is None:
        del cfg["dspark_block_size"]
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_dict(cfg)


def test_main_proj_that_does_not_fit_the_taps_is_named(tmp_path):
    path = write_tiny_checkpoint(tmp_path, dspark=True, vocab_size=VOCAB)
    config = json.loads((path / "config.json").read_text())
    config["dspark_target_layer_ids"] = [1, 3]  # the checkpoint's main_proj reads three layers
    (path / "config.json").write_text(json.dumps(config))
    assert load_model(path, check_memory=False).dspark is None  # plain decoding does not read the drafter
    with pytest.raises(CheckpointError, match=r"tensor mtp.0.main_proj.weight has shape \(64, 192\), but the "
                                              r"target model's dspark_target_layer_ids \[1, 3\] tap 2 decoder "
                                              r"layer\(s\) of hidden_size 64: expected \(64, 128\)"):
        load_model(path, check_memory=False, mtp=True)


def test_missing_markov_head_is_named(tmp_path):
    path = write_tiny_checkpoint(tmp_path, dspark=True, vocab_size=VOCAB)
    weights = mx.load(str(path / "model.safetensors"))
    del weights["mtp.1.markov_head.markov_w2.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match=r"missing DSpark tensors \(1\): mtp.1.markov_head.markov_w2.weight"):
        load_model(path, check_memory=False, mtp=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from convert_fixtures import tiny_cfg, write_release_checkpoint
    from mlx_dsv4.convert.convert import convert
    from mlx_dsv4.convert.recipes import Recipe

    root = tmp_path_factory.mktemp("converted")
    cfg = tiny_cfg(compress_ratios=[0, 4, 128], num_hash_layers=1, **dspark_config(3, 256))
    src, _, _ = write_release_checkpoint(root / "src", seed=3, n_shards=2, cfg=cfg)
    recipes = {"none": Recipe("none", dtype="float32"), "native32": Recipe("native", dtype="float32"),
               "q4": Recipe("q4", group_size=32, dtype="float32")}
    for name, recipe in recipes.items():
        convert(src, root / name, recipe, progress=False, log=lambda s: None)
    convert(src, root / "no-mtp", recipes["none"], include_mtp=False, progress=False, log=lambda s: None)
    return root


def _drafter_logits(path):
    model = load_model(path, check_memory=False, mtp=True)
    drafter = model.dspark
    tokens = mx.array([list(range(3, 35))])
    _, taps = model(tokens, model.make_cache("float", "float"), return_hidden=True, tap_layers=drafter.tap_layers)
    cache = drafter.make_cache("float", "float")
    drafter.read(taps, cache)
    logits = drafter.block_logits(mx.array([[7, 255, 255]]), model.embed, model.head, cache)
    return model, np.array(logits.astype(mx.float32))


def test_converted_checkpoints_keep_the_dspark_drafter(converted):
    from mlx_dsv4.layers import QuantizedSwitchLinear

    index = json.loads((converted / "none" / "mtp.safetensors.index.json").read_text())["weight_map"]
    assert {"mtp.0.main_proj.weight", "mtp.0.main_norm.weight", "mtp.1.markov_head.markov_w1.weight",
            "mtp.1.markov_head.markov_w2.weight", "mtp.1.hc_head_fn", "mtp.1.norm.weight"} <= set(index)
    assert not any(k.startswith("mtp.0.e_proj") for k in index)
    _, ref = _drafter_logits(converted / "none")
    _, native = _drafter_logits(converted / "native32")
    assert np.abs(native - ref).max() <= 1e-5 * np.abs(ref).max()
    model, q4 = _drafter_logits(converted / "q4")
    stage = model.dspark.mtp[0]
    assert isinstance(stage.ffn.experts.w1, QuantizedSwitchLinear)
    assert "scales" in stage.main_proj
    assert np.isfinite(q4).all() and np.abs(q4 - ref).max() < np.abs(ref).max()
    # --no-mtp drops the drafter with the rest of the mtp.* tensors
    assert not (converted / "no-mtp" / "mtp.safetensors.index.json").exists()
    assert load_model(converted / "no-mtp", check_memory=False, mtp=True).dspark is None


def test_a_drafted_dspark_turn_resumes_from_the_prompt_cache(chat_dspark, tmp_path):
    """The DSpark drafter's cache travels with the prompt cache, in memory and through a file: the
    second turn starts from the snapshot and gives plain greedy decoding's tokens; the restored
    drafter cache is bit-equal to one built from scratch over the same tokens."""
    from mlx_dsv4 import load
    from mlx_dsv4.generate import PromptCache, generate, load_prompt_cache, save_prompt_cache
    from mlx_dsv4.speculative import DSparkDrafting

    model, tok = load(chat_dspark, mtp=True)
    prompt = "<｜begin▁of▁sentence｜><｜User｜>Name a bird and a tree.<｜Assistant｜></think>"
    pc = PromptCache(model)
    generate(model, tok, prompt, max_tokens=10, draft="dspark", num_draft=3, prompt_cache=pc)
    first = max(pc.snapshots, key=lambda s: len(s.tokens))
    assert first.draft is not None and first.draft["drafter"] == "dspark"
    scratch = DSparkDrafting(model, model.make_cache())
    scratch.extend(first.tokens, 0, len(first.tokens))
    def bits(arrays):
        return {k: bytes(memoryview(v.view(mx.uint8))) for k, v in arrays.items()}

    assert bits(scratch.drafter_state()[0]) == bits(first.draft["arrays"])

    ids = first.tokens + tok.encode(" And a fish?")
    plain = generate(model, tok, ids, max_tokens=10)
    again = generate(model, tok, ids, max_tokens=10, draft="dspark", num_draft=3, prompt_cache=pc)
    assert again.tokens == plain.tokens and again.stats["cached_tokens"] == len(first.tokens)
    path = tmp_path / "turn.safetensors"
    save_prompt_cache(path, pc)
    fresh, _ = load(chat_dspark, mtp=True)
    from_file = generate(fresh, tok, ids, max_tokens=10, draft="dspark", num_draft=3,
                         prompt_cache=load_prompt_cache(path, fresh))
    assert from_file.tokens == plain.tokens and from_file.stats["cached_tokens"] >= len(first.tokens)
