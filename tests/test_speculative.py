"""The MTP layer and greedy speculative decoding on tiny checkpoints."""

import random

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from generate_support import forced_drafts
from mlx_dsv4.layers import QuantizedSwitchLinear
from mlx_dsv4.loader import CheckpointError, load_model, to_mlx_layout
from mlx_dsv4.model import Block
from mlx_dsv4.mtp import _mtp_block_args
from mlx_dsv4.spec import mtp_layer_tensors
from mlx_dsv4.speculative import Drafting
from mlx_dsv4.tiny import write_tiny_checkpoint

PROMPT = list(range(10, 40))
N_GENERATED = 300  # crosses the 128-token compression and sliding-window boundaries


@pytest.fixture(scope="module", params=["flash", "pro"])
def tiny(request, tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), preset=request.param)
    return request.param, path, load_model(path, check_memory=False, mtp=True)


def test_mtp_layer_loads_with_the_spec_shapes(tiny):
    _, _, model = tiny
    assert len(model.mtp_layers) == model.args.num_nextn_predict_layers == 1
    got = {f"mtp.0.{k}": tuple(v.shape) for k, v in tree_flatten(model.mtp_layers[0].parameters())}
    expected = {k: tuple(v.shape) for k, v in to_mlx_layout(
        {k: mx.zeros(s) for k, s in mtp_layer_tensors(model.args, 0).items()}, model.args).items()}
    assert got == expected
    assert not any(k.startswith("mtp") for k, _ in tree_flatten(model.parameters()))


def test_checkpoint_without_mtp_loads_without_drafter(tmp_path):
    model = load_model(write_tiny_checkpoint(tmp_path, mtp=False), check_memory=False, mtp=True)
    assert model.mtp_layers == ()
    with pytest.raises(ValueError, match="no MTP layer"):
        Drafting(model, model.make_cache())


def test_incomplete_mtp_layer_is_named(tmp_path):
    path = write_tiny_checkpoint(tmp_path)
    weights = mx.load(str(path / "model.safetensors"))
    del weights["mtp.0.e_proj.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match=r"missing MTP tensors \(1\): mtp.0.e_proj.weight"):
        load_model(path, check_memory=False, mtp=True)


def _rms(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def test_mtp_output_matches_the_published_semantics(tiny):
    """enorm/e_proj of the next token's embedding added to hnorm/h_proj of every main stream,
    one block, then the layer's own hc head and norm and the shared output head."""
    _, path, model = tiny
    a = model.args
    raw = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path / "model.safetensors")).items()}
    tokens = PROMPT[:20]
    _, hidden = model(mx.array([tokens]), model.make_cache("float", "float"), return_hidden=True)
    nxt = tokens[1:] + [7]
    eps = a.rms_norm_eps

    e = _rms(raw["embed.weight"][nxt], raw["mtp.0.enorm.weight"], eps) @ raw["mtp.0.e_proj.weight"].T
    h = _rms(np.array(hidden[0]), raw["mtp.0.hnorm.weight"], eps) @ raw["mtp.0.h_proj.weight"].T
    x = (e[:, None, :] + h)[None].astype(np.float32)

    # the block itself is the decoder's Block (tested on its own) holding the mtp.0 block tensors
    block = Block(_mtp_block_args(a), a.num_hidden_layers)
    names = dict(tree_flatten(block.parameters()))
    block_weights = to_mlx_layout({k: mx.array(raw[k]) for k in mtp_layer_tensors(a, 0)}, a)
    block.load_weights([(k[len("mtp.0."):], v) for k, v in block_weights.items() if k[len("mtp.0."):] in names],
                       strict=True)
    cache = model.mtp_layers[0].make_cache("float", "float")
    streams = np.array(block(mx.array(x), mx.array([nxt]), cache.layers[0], cache.query_block)[0]).astype(np.float64)

    flat = streams.reshape(len(nxt), -1)
    flat = flat / np.sqrt((flat * flat).mean(-1, keepdims=True) + eps)
    mixes = flat @ raw["mtp.0.hc_head_fn"].T
    pre = 1 / (1 + np.exp(-(mixes * raw["mtp.0.hc_head_scale"] + raw["mtp.0.hc_head_base"]))) + a.hc_eps
    y = (pre[..., None] * streams).sum(1)
    expected = _rms(y, raw["mtp.0.norm.weight"], eps) @ raw["head.weight"].T

    mtp = model.mtp_layers[0]
    logits, own = mtp(hidden, mx.array([nxt]), model.embed, model.head, mtp.make_cache("float", "float"))
    assert own.shape == hidden.shape
    np.testing.assert_allclose(np.array(logits[0]), expected, rtol=1e-3, atol=1e-3)


def _plain(model, n):
    """Plain greedy decoding of n tokens: (tokens, hc streams per position, prompt + tokens, the
    logits of each step: logits[i] is what decoding gave after feeding token i - 1)."""
    cache = model.make_cache()
    logits, hidden = model(mx.array([PROMPT]), cache, return_hidden=True)
    steps = [np.array(logits[0, -1])]
    out = [int(np.argmax(steps[-1]))]
    hs = [hidden[:, i : i + 1] for i in range(len(PROMPT))]
    while len(out) < n:
        logits, h = model(mx.array([[out[-1]]]), cache, return_hidden=True)
        hs.append(h)
        steps.append(np.array(logits[0, -1]))
        out.append(int(np.argmax(steps[-1])))
    logits = model(mx.array([[out[-1]]]), cache)
    steps.append(np.array(logits[0, -1]))
    return out, hs, PROMPT + out, steps


@pytest.fixture(scope="module")
def plain(tiny):
    return _plain(tiny[2], N_GENERATED + 12)


def _forced(continuation, rng):
    return forced_drafts(continuation, len(PROMPT), 1000, rng)


def test_speculative_equals_plain_greedy_and_leaves_plain_caches(tiny, plain):
    """Rounds cycling k = 1..4 against forced acceptance cycling all, none, random: every k meets
    every pattern, and their boundaries fall all over the 128-token compression windows."""
    _, _, model = tiny
    expected = plain[0]
    drafting = Drafting(model, model.make_cache())
    drafting.adjust_drafts, rounds = _forced(expected, random.Random(1))
    ks = []
    out = [int(mx.argmax(drafting.prefill(PROMPT, 16)).item())]
    while len(out) < N_GENERATED:
        ks.append(len(ks) % 4 + 1)
        out += [t for t, _ in drafting.round(out[-1], ks[-1])]
    assert out == expected[: len(out)]
    assert drafting.accepted == sum(rounds) and drafting.proposed == sum(ks)
    assert {(k, n == k, n == 0) for k, n in zip(ks, rounds)} >= {(k, a, not a) for k in range(1, 5) for a in (0, 1)}
    _check_plain_caches(model, drafting, out, plain)


def test_plain_steps_between_rounds_leave_plain_caches(tiny, plain):
    """Plain steps (speculation switched off) interleaved with rounds (each order of the two, twice
    in a row of each, ending on a plain step) past the first 128-token boundary: the output of plain greedy decoding, and the drafter
    reads the plain steps' positions at the next round."""
    _, _, model = tiny
    expected = plain[0]
    drafting = Drafting(model, model.make_cache())
    drafting.adjust_drafts, _ = _forced(expected, random.Random(7))
    out = [int(mx.argmax(drafting.prefill(PROMPT, 16)).item())]
    pattern = "RPPRRP"
    i = 0
    while len(out) < 160 or pattern[(i - 1) % len(pattern)] != "P":
        step = drafting.round(out[-1], 3) if pattern[i % len(pattern)] == "R" else drafting.plain_step(out[-1])
        out += [t for t, _ in step]
        i += 1
    assert out == expected[: len(out)]
    assert drafting.unread_tokens
    drafting._read_unread()
    _check_plain_caches(model, drafting, out, plain)


def _check_plain_caches(model, drafting, out, plain):
    expected, plain_hidden, seq, plain_logits = plain
    n = len(out)
    # main cache: the next token's logits as plain decoding's cache gave them
    assert drafting.cache.offset == len(PROMPT) + n - 1
    got = model(mx.array([[out[-1]]]), drafting.cache)
    np.testing.assert_allclose(np.array(got[0, -1]), plain_logits[n], rtol=1e-3, atol=1e-3)
    # drafter cache: positions 0..total-2 read plain decoding's streams and next tokens
    mtp = model.mtp_layers[0]
    ref_draft = mtp.make_cache(drafting.cache.kv_dtype, drafting.cache.index_dtype, dtype=model.dtype)
    total = len(PROMPT) + n
    hidden = mx.concatenate(plain_hidden[: total - 1], axis=1)
    mtp(hidden[:, :-1], mx.array([seq[1 : total - 1]]), model.embed, model.head, ref_draft)
    assert drafting.draft_cache.offset == ref_draft.offset == total - 2
    probe = (hidden[:, -1:], mx.array([[seq[total - 1]]]))
    got, _ = mtp(*probe, model.embed, model.head, drafting.draft_cache)
    want, _ = mtp(*probe, model.embed, model.head, ref_draft)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from convert_fixtures import write_release_checkpoint
    from mlx_dsv4.convert.convert import convert
    from mlx_dsv4.convert.recipes import Recipe

    root = tmp_path_factory.mktemp("converted")
    src, _, _ = write_release_checkpoint(root / "src", seed=3, n_shards=2, vocab_size=512)
    recipes = {"none": Recipe("none", dtype="float32"), "native32": Recipe("native", dtype="float32"),
               "q4": Recipe("q4", group_size=32, dtype="float32")}
    for name, recipe in recipes.items():
        convert(src, root / name, recipe, progress=False, log=lambda s: None)
    return root


def _mtp_logits(path):
    model = load_model(path, check_memory=False, mtp=True)
    tokens = mx.array([list(range(3, 35))])
    _, hidden = model(tokens, model.make_cache("float", "float"), return_hidden=True)
    mtp = model.mtp_layers[0]
    logits, _ = mtp(hidden, tokens, model.embed, model.head, mtp.make_cache("float", "float"))
    return model, np.array(logits.astype(mx.float32))


def test_converted_checkpoints_load_their_mtp_layer(converted):
    assert (converted / "none" / "mtp.safetensors.index.json").exists()
    assert list((converted / "none").glob("mtp-*.safetensors"))
    _, ref = _mtp_logits(converted / "none")
    _, native = _mtp_logits(converted / "native32")
    assert np.abs(native - ref).max() <= 1e-5 * np.abs(ref).max()
    model, q4 = _mtp_logits(converted / "q4")
    mtp = model.mtp_layers[0]
    assert isinstance(mtp.ffn.experts.w1, QuantizedSwitchLinear)
    assert "scales" in mtp.attn.wq_a
    assert np.isfinite(q4).all() and np.abs(q4 - ref).max() < np.abs(ref).max()


def test_prefill_reads_out_only_the_last_position(tiny, monkeypatch):
    """The vocabulary head runs on one position per prefill chunk, not on every position of it."""
    import mlx_dsv4.model as model_module

    _, _, model = tiny
    rows = []
    head = model_module.split_outputs

    def recording(layer, x):
        rows.append(x.shape[1])
        return head(layer, x)

    monkeypatch.setattr(model_module, "split_outputs", recording)
    ids = list(range(5, 45))
    logits = Drafting(model, model.make_cache()).prefill(ids, 16)
    assert rows == [1, 1, 1]
    expected = model(mx.array([ids]), model.make_cache())[0, -1]
    np.testing.assert_allclose(np.array(logits.astype(mx.float32)), np.array(expected.astype(mx.float32)),
                               rtol=1e-5, atol=1e-5)


def _switch_run(switch, spec_s, plain_s, tokens=2000, per_round=3):
    """Feed ``switch`` rounds of synthetic timings; the share of tokens emitted speculatively."""
    done = spec = 0
    while done < tokens:
        if switch.speculate():
            switch.record(per_round * spec_s(done), per_round)
            done += per_round
            spec += per_round
        else:
            switch.record(plain_s(done), 1)
            done += 1
    return spec / done


def test_draft_switch_runs_the_faster_way_and_probes_the_other():
    from mlx_dsv4.speculative import DraftSwitch

    # speculation three times slower per token (a drafter the model rejects): almost all plain
    assert _switch_run(DraftSwitch(), lambda _: 3.0, lambda _: 1.0) < 0.05
    # speculation twice as fast: almost all speculative
    assert _switch_run(DraftSwitch(), lambda _: 0.5, lambda _: 1.0) > 0.95
    # the acceptance drops halfway: the switch follows within a few probes
    switch = DraftSwitch()
    assert _switch_run(switch, lambda _: 0.5, lambda _: 1.0, tokens=1000) > 0.95
    assert _switch_run(switch, lambda _: 3.0, lambda _: 1.0, tokens=1000) < 0.1
    assert not switch.speculate() or switch.probing


def test_draft_switch_spaces_probes_of_a_much_slower_drafter_by_their_cost():
    """Speculation 7x slower per token (every draft rejected): after the first probe, the next
    ones are far enough apart to cost about 5% of the time; doubling alone lost 9% over 2,000
    tokens and 42% over 256 (two probes within them)."""
    from mlx_dsv4.speculative import DraftSwitch

    def lost(tokens):  # time beyond all-plain decoding, as a share of it
        return _switch_run(DraftSwitch(), lambda _: 7.0, lambda _: 1.0, tokens=tokens) * (7.0 - 1)

    assert lost(2000) < 0.07
    assert lost(256) < 0.2  # the first probe alone (two rounds of three tokens) is 0.14
    switch = DraftSwitch()
    _switch_run(switch, lambda _: 7.0, lambda _: 1.0, tokens=100)
    assert not switch.speculate() and switch.interval >= 4 * 6 / 0.05
