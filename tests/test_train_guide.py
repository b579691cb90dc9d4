"""The copy objectives: the attention guidance's targets sit where `fast._banded` keeps each
position's window, its terms read the attention the model computes; the copy head's own
prediction is that head's output alone through the output projection and the vocabulary head;
training steps with them run and lower them; a tied head stays the scaled embedding."""

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dsv4.hc import expand, split_options
from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train import fast
from mlx_dsv4.train.trainer import (Trainer, TrainOptions, answer_attention_loss, copy_output_loss, copy_sources,
                                    copy_value_loss, copy_value_positions, entry_guide_loss, entry_value_loss,
                                    guide_loss, init_model, load_run, offset_loss, retrieval_source, trained_config)


def _dense_attention(attn, x: mx.array) -> np.ndarray:
    """Probabilities [L, H, L] of a sliding-window layer's heads over the positions, computed
    directly (causal, window, sink) rather than by blocks."""
    _, q, kv = attn._project(x, 0)
    s = np.einsum("lhd,md->lhm", np.array(q[0]), np.array(kv[0])) * attn.scale
    L = s.shape[0]
    delta = np.arange(L)[:, None] - np.arange(L)[None, :]
    s = np.where(((delta >= 0) & (delta < attn.window))[:, None, :], s, -np.inf)
    sink = np.array(attn.attn_sink)[None, :, None] * np.ones((L, 1, 1))
    full = np.concatenate([s, sink], axis=-1)
    full = np.exp(full - full.max(-1, keepdims=True))
    return (full / full.sum(-1, keepdims=True))[..., :L]


@pytest.fixture(scope="module")
def layer0_state():
    cfg = trained_config()
    model, _ = init_model(cfg, seed=3)
    rng = np.random.default_rng(0)
    L = 300  # three query blocks
    ids = rng.integers(2, 40, L).astype(np.int32)  # a small alphabet: many repeats in the window
    records = {}
    fast.trunk(model, mx.array(ids[None]), records, probs_of=(0,))
    layer = model.layers[0]
    a = model.args
    x = model.embed(mx.array(ids[None]))
    h = expand(x, a.hc_mult)
    xin, _, _ = layer._attn_input(h, split_options(a))
    return ids, records[0], _dense_attention(layer.attn, xin), layer.attn.window, model, xin


def test_copy_sources_mark_the_earlier_occurrences_in_the_window():
    ids = np.array([5, 7, 9, 5, 7, 3, 3, 3, 3, 3, 3, 8], np.int32)
    queries, masks = copy_sources(ids, np.arange(len(ids) - 1), window=4, block=4)
    # j=2, 3: the next 5 and 7 seen before; j=4: no 3 in 1..4; j=5..9: one to four 3s in the window
    # of four positions (j-3..j); j=0, 1, 10: the next token is not in the window
    assert queries.tolist() == [2, 3, 5, 6, 7, 8, 9]
    b = 4
    for j, row in zip(queries, masks):
        positions = np.nonzero(row)[0] + (j // b) * b - b
        lo = max(0, j - 3)
        assert positions.tolist() == [p for p in range(lo, j + 1) if ids[p] == ids[j + 1]]
    few = copy_sources(np.array([3] * 7 + [3], np.int32), np.array([6]), window=8, block=8)
    assert len(few[0]) == 0  # seven earlier occurrences: not a copy target


def test_guidance_reads_the_layers_attention(layer0_state):
    ids, record, dense, window, _, _ = layer0_state
    probs, block = np.array(record["probs"][0]), record["block"]
    L = len(ids)
    for j in range(1, L):
        slot = (j - 1) - (j // block) * block + block
        assert probs[j, 0, slot] == pytest.approx(dense[j, 0, j - 1], rel=1e-4, abs=1e-7)
    queries, masks = copy_sources(ids, np.arange(L - 1), window, block)
    assert len(queries) > 200
    for j, row in zip(queries, masks):
        sources = [p for p in range(max(0, j - window + 1), j + 1) if ids[p] == ids[j + 1]]
        assert float((probs[j, 0, : 2 * block] * row).sum()) == pytest.approx(dense[j, 0, sources].sum(), rel=1e-4)
    loss = float(guide_loss(record["probs"], record["probs"], block, queries, masks))
    copy_mass = np.array([dense[j, 0, [p for p in range(max(0, j - window + 1), j + 1) if ids[p] == ids[j + 1]]].sum()
                          for j in queries])
    previous = np.array([dense[j, 0, j - 1] for j in range(1, L)])
    expected = -np.log(copy_mass + 1e-6).mean() - np.log(previous + 1e-6).mean()
    assert loss == pytest.approx(expected, rel=1e-4)


def test_key_guidance_reads_the_attention_offset_back(layer0_state):
    ids, record, dense, _, _, _ = layer0_state
    L = len(ids)
    for head, offset in ((1, 3), (0, 1), (2, 7)):
        got = float(offset_loss(record["probs"], record["block"], head=head, offset=offset))
        expected = -np.log(np.array([dense[j, head, j - offset] for j in range(offset, L)]) + 1e-6).mean()
        assert got == pytest.approx(expected, rel=1e-4)


def test_key_guide_steps_teach_a_head_to_look_three_back_and_name_what_it_sees():
    options = TrainOptions(steps=6, mix={"pattern": 1.0}, key_guide_weight=1.0, key_output_weight=1.0, lr=1e-2,
                           warmup=1, max_tokens=256)
    trainer = Trainer(load_tokenizer(None), options)
    batch, _ = trainer.batch()
    ids, key_pos = np.array(batch["tokens"][0]), batch["key_pos"]
    _, counts = np.unique(ids, return_counts=True)
    rare = set(np.unique(ids)[counts <= 2].tolist())
    assert len(key_pos) and all(ids[p - 3] in rare for p in key_pos) and key_pos.max() < len(ids)
    records = [trainer.train_step() for _ in range(6)]
    losses = [r["key_guide"] for r in records]
    assert losses[0] > 2.0 and np.mean(losses[-2:]) < losses[0] - 1.0, losses
    named = [r["key_output"] for r in records]
    assert named[0] > 8.0 and np.mean(named[-2:]) < named[0] - 1.0, named
    with pytest.raises(ValueError, match="fast path"):
        Trainer(load_tokenizer(None), options, reference=True)


def test_key_readback_steps_bring_the_key_to_the_csa_layer_through_a_map_that_is_not_saved(tmp_path):
    options = TrainOptions(steps=6, mix={"pattern": 1.0}, key_guide_weight=1.0, key_readback_weight=1.0, lr=1e-2,
                           warmup=1, max_tokens=256)
    trainer = Trainer(load_tokenizer(None), options)
    rotation = np.array(trainer._joint.readback.weight)
    batch, _ = trainer.batch()
    ids, key_pos = np.array(batch["tokens"][0]), batch["key_pos"]
    values, counts = np.unique(ids, return_counts=True)
    count = dict(zip(values.tolist(), counts.tolist()))
    assert len(key_pos) and all(count[ids[p - 3]] <= 2 < count[ids[p]] for p in key_pos)
    trainer = Trainer(load_tokenizer(None), options)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(len(rotation)), atol=1e-5)
    records = [trainer.train_step() for _ in range(6)]
    read = [r["key_readback"] for r in records]
    assert read[0] > 8.0 and np.mean(read[-2:]) < read[0] - 1.0, read
    assert "key_output" not in records[0]
    trained = np.array(trainer._joint.readback.weight)
    assert np.abs(trained - rotation).max() > 1e-3
    trainer.save_official(tmp_path)
    saved = mx.load(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(trainer.official_weights()) and not any("readback" in k for k in saved)
    resumed = Trainer(load_tokenizer(None), options)
    assert resumed.resume(tmp_path) == 6
    np.testing.assert_array_equal(np.array(resumed._joint.readback.weight), trained)


def test_entry_key_steps_teach_a_map_to_read_each_lines_key_from_its_values_csa_entry(tmp_path):
    tokenizer = load_tokenizer(None)
    options = TrainOptions(steps=12, mix={"retrieval": 1.0}, retrieval_tokens=(300, 400), entry_key_weight=1.0,
                           lr=1e-2, warmup=1)
    trainer = Trainer(tokenizer, options)
    batch, kinds = trainer.batch()
    ids, pairs = np.array(batch["tokens"][0]), batch["entry_keys"]
    lines = tokenizer.decode(ids.tolist()).count(": ")
    assert kinds == ["retrieval"] and lines - 2 <= len(pairs) <= lines  # the last lines' blocks may be incomplete
    for key, value in pairs:
        assert value == key + 3 and tokenizer.decode(ids[key: value + 1].tolist()).count(": ") == 1
        assert (value + 1) // 4 <= len(ids) // 4
    trainer = Trainer(tokenizer, options)
    records = [trainer.train_step() for _ in range(12)]
    read = [r["entry_key"] for r in records]
    assert read[0] > 6.0 and np.mean(read[-2:]) < read[0] - 1.0, read
    trainer.save_official(tmp_path)
    assert not any("readback" in k for k in mx.load(str(tmp_path / "model.safetensors")))
    resumed = Trainer(tokenizer, options)
    resumed.resume(tmp_path)
    np.testing.assert_array_equal(np.array(resumed._joint.entry_readback.weight),
                                  np.array(trainer._joint.entry_readback.weight))
    # a run started from this one's weights goes on with its map too (a fresh one would read noise)
    follow = Trainer(tokenizer, TrainOptions(init_from=str(tmp_path), entry_key_weight=1.0, seed=7))
    np.testing.assert_array_equal(np.array(follow._joint.entry_readback.weight),
                                  np.array(trainer._joint.entry_readback.weight))


def test_entry_value_and_answer_output_steps_teach_the_csa_head_to_name_values_from_entries():
    tokenizer = load_tokenizer(None)
    options = TrainOptions(steps=12, mix={"retrieval": 1.0}, retrieval_tokens=(300, 400), retrieval_questions=4,
                           entry_value_weight=1.0, answer_output_weight=1.0, lr=1e-2, warmup=1)
    trainer = Trainer(tokenizer, options)
    batch, _ = trainer.batch()
    ids, model = np.array(batch["tokens"][0]), trainer.model
    # the entry value loss is the value's entry, alone, through head 0 of the CSA layer
    records = {}
    fast.trunk(model, batch["tokens"], records)
    entries, values = records[2]["entries"], batch["entry_keys"][:, 1]
    heads = mx.zeros((1, len(ids), 4, entries.shape[-1]))
    heads[0, mx.array(values), 0] = entries[0, mx.array(values // 4)]
    feats = model.norm(model.layers[2].attn._output(heads, 0)[0, mx.array(values)])
    logits = np.array(feats @ trainer._head(model).T)
    expected = np.mean(np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
                       - logits[np.arange(len(values)), ids[values]])
    got = entry_value_loss(model, 2, entries, batch["tokens"], values, trainer._head(model))
    assert float(got) == pytest.approx(expected, rel=1e-4)
    assert len(batch["entry_query"]) == 4 and all(ids[q - 3] != ids[q + 1] for q, _ in batch["entry_query"])
    # the answer attention is head 0's softmax over its window, the indexer's picks and the sink, computed here
    records = {}
    fast.trunk(model, batch["tokens"], records, probs_of=(2,))
    r, attn = records[2], model.layers[2].attn
    kv, q, entries = np.array(r["kv"][0]), np.array(r["q"][0, :, 0]), np.array(r["entries"][0])
    index = fast.index_scores(r["iq"], r["iw"], r["keys"])[0]
    expected = []
    for query, held in batch["entry_query"]:
        window = np.arange(max(0, query - attn.window + 1), query + 1)
        visible = np.arange(len(entries)) < (query + 1) // 4
        picked = fast.top_k_mask(index[query][None, None], visible[None, None], attn.indexer.topk)[0, 0]
        scores = np.concatenate([kv[window] @ q[query] * attn.scale, entries @ q[query] * attn.scale,
                                 [float(attn.attn_sink[0])]])
        scores[len(window):-1][~picked] = -np.inf
        p = np.exp(scores - scores.max())
        p /= p.sum()
        expected.append(-np.log(p[len(window) + np.array(held)].sum() + 1e-6))
    got = answer_attention_loss(r["probs"], r["block"], batch["entry_query"])
    assert float(got) == pytest.approx(np.mean(expected), rel=1e-4)
    steps = [trainer.train_step() for _ in range(12)]
    for name in ("entry_value", "answer_output"):
        curve = [r[name] for r in steps]
        assert curve[0] > 8.0 and np.mean(curve[-2:]) < curve[0] - 1.0, (name, curve)


def test_each_of_several_retrieval_questions_is_guided_to_its_own_line():
    tokenizer = load_tokenizer(None)
    options = TrainOptions(seed=1, mix={"retrieval": 1.0}, retrieval_tokens=(600, 700), entry_guide_weight=1.0,
                           retrieval_questions=4)
    batch, kinds = Trainer(tokenizer, options).batch()
    assert kinds == ["retrieval"]
    ids = np.array(batch["tokens"][0])
    text = tokenizer.decode(ids.tolist())
    assert text.count("What is the value of key") == 4 and text.count("Here is a list") == 1
    queries = [q for q, _ in batch["entry_query"]]
    assert len(queries) == 4 and len({int(ids[q - 3]) for q in queries}) == 4  # four distinct keys
    for query, held in batch["entry_query"]:
        source = retrieval_source(ids, query)
        line = tokenizer.decode(ids[source - 3: source + 1].tolist())
        assert line == f"{tokenizer.decode([int(ids[query - 3])])}: {tokenizer.decode([int(ids[query + 1])])}"
        assert held == [source // 4]
    assert set(queries) < set(np.array(batch["main_pos"]).tolist())


def test_copy_output_is_the_first_heads_own_prediction(layer0_state):
    ids, record, dense, window, model, xin = layer0_state
    attn = model.layers[0].attn
    _, _, kv = attn._project(xin, 0)
    first = dense[:, 0, :] @ np.array(kv[0])  # head 0's output [L, hd]
    heads = np.array(record["heads"][0])
    np.testing.assert_allclose(heads[:, 0], first, rtol=1e-4, atol=1e-5)

    queries, _ = copy_sources(ids, np.arange(len(ids) - 1), window, record["block"])
    alone = np.zeros_like(heads)
    alone[:, 0] = first
    feats = np.array(model.norm(attn._output(mx.array(alone[None]), 0)[0]))[queries]
    logits = feats.astype(np.float64) @ np.array(model.head.weight).T.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -log_p[np.arange(len(queries)), ids[queries + 1]].mean()
    tokens = mx.array(ids[None])
    loss = float(copy_output_loss(model, 0, record["heads"], tokens, queries))
    assert loss == pytest.approx(expected, rel=1e-4)
    others = heads.copy()
    others[:, 1:] = np.random.default_rng(1).normal(size=others[:, 1:].shape)  # the other heads do not count
    assert float(copy_output_loss(model, 0, mx.array(others[None]), tokens, queries)) == pytest.approx(loss, rel=1e-5)


def test_copy_value_is_the_output_projection_of_each_positions_own_value(layer0_state):
    ids, record, _, _, model, xin = layer0_state
    attn = model.layers[0].attn
    _, _, kv = attn._project(xin, 0)
    np.testing.assert_allclose(np.array(record["kv"][0]), np.array(kv[0]), rtol=1e-6, atol=1e-6)
    positions = np.array([0, 5, 17, 150, 299], np.int32)
    alone = np.zeros(record["heads"].shape[1:], np.float32)
    alone[:, 0] = np.array(kv[0])  # head 0 attending only to its own position
    feats = np.array(model.norm(attn._output(mx.array(alone[None]), 0)[0]))[positions]
    logits = feats.astype(np.float64) @ np.array(model.head.weight).T.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -log_p[np.arange(len(positions)), ids[positions]].mean()
    loss = float(copy_value_loss(model, 0, record["kv"], mx.array(ids[None]), positions))
    assert loss == pytest.approx(expected, rel=1e-4)


def test_copy_value_positions_are_the_rare_tokens():
    ids = np.array([9, 4, 4, 7, 9, 9, 2, 8, 7, 4], np.int32)  # 9 and 4 three times, 7 twice, 2 and 8 once
    rng = np.random.default_rng(0)
    assert copy_value_positions(ids, 16, rng).tolist() == [3, 6, 7, 8]
    some = copy_value_positions(ids, 2, rng)
    assert len(some) == 2 and set(some.tolist()) < {3, 6, 7, 8} and some.tolist() == sorted(some.tolist())


def test_copy_steps_lower_their_objectives(tmp_path):
    tokenizer = load_tokenizer(None)
    options = TrainOptions(steps=8, mix={"copy": 1.0}, guide_weight=1.0, copy_output_weight=1.0, copy_value_weight=1.0,
                           lr=1e-2, warmup=1, max_tokens=512)
    trainer = Trainer(tokenizer, options)
    first, _ = trainer.batch()
    trainer.data, trainer.rng = Trainer(tokenizer, options).data, np.random.default_rng(options.seed)
    records = [trainer.train_step() for _ in range(8)]
    guides = [r["guide"] for r in records]
    outputs = [r["copy_output"] for r in records]
    assert np.mean(guides[-3:]) < guides[0] - 1.0, guides
    assert np.mean(outputs[-3:]) < outputs[0] - 1.0, outputs
    (_, parts), _ = trainer._grad(trainer._joint, *(first[k] for k in (
        "tokens", "main_pos", "main_targets", "mtp_pos", "mtp_targets", "index_pos", "copy_queries", "copy_masks",
        "value_pos")))
    # the first batch's rare tokens, named from their own values far better than before its step
    assert float(parts["copy_value"]) < records[0]["copy_value"] - 2.0, (float(parts["copy_value"]),
                                                                        records[0]["copy_value"])
    trainer.save_official(tmp_path)
    saved = json.loads((tmp_path / "train_options.json").read_text())
    assert (saved["guide_weight"], saved["copy_output_weight"], saved["copy_value_weight"], saved["copy_layer"],
            saved["previous_layer"]) == (1.0, 1.0, 1.0, 3, 0)
    with pytest.raises(ValueError, match="fast path"):
        Trainer(tokenizer, options, reference=True)


def test_head_from_embed_starts_the_head_as_the_scaled_embedding():
    trainer = Trainer(load_tokenizer(None), TrainOptions(head_from_embed=True))
    embed, head = np.array(trainer.model.embed.weight), np.array(trainer.model.head.weight)
    np.testing.assert_array_equal(head, embed * np.float32(64 ** -0.5))
    plain = Trainer(load_tokenizer(None), TrainOptions())
    np.testing.assert_array_equal(np.array(plain.model.embed.weight), embed)
    assert np.abs(np.array(plain.model.head.weight) - head).max() > 0.1


def test_tied_head_stays_the_scaled_embedding(tmp_path):

    options = TrainOptions(steps=3, tie_head=True, embed_scale=4.0, embed_lr_scale=4.0, lr=1e-2, warmup=1,
                           max_tokens=256)
    trainer = Trainer(load_tokenizer(None), options)
    assert not any(k.startswith("model.head.") for k, _ in tree_flatten(trainer._joint.trainable_parameters()))
    start = np.array(trainer.model.embed.weight)
    drawn, _ = init_model(trainer.cfg, options.seed)
    np.testing.assert_allclose(start, np.array(drawn.embed.weight) * 4, rtol=1e-6)
    for _ in range(2):
        trainer.train_step()
    embed = np.array(trainer.model.embed.weight)
    assert np.abs(embed - start).max() > 1e-3  # the embedding trained (as input and as head)
    trainer.save_official(tmp_path)
    model, _, saved = load_run(tmp_path)
    assert saved.tie_head and saved.embed_scale == 4.0
    np.testing.assert_array_equal(np.array(model.embed.weight), embed)
    np.testing.assert_allclose(np.array(model.head.weight), embed * (64 ** -0.5 / 4), rtol=1e-6)
    # the optimizer state of both learning rates goes on from the saved run
    resumed = Trainer(load_tokenizer(None), options)
    assert resumed.resume(tmp_path) == 2
    assert resumed.train_step()["loss"] == trainer.train_step()["loss"]


@pytest.mark.parametrize("option, layer", [("copy_head_scale", 3), ("answer_head_scale", 2)])
def test_a_head_scale_scales_only_its_heads_output(option, layer):
    plain = Trainer(load_tokenizer(None), TrainOptions())
    loud = Trainer(load_tokenizer(None), TrainOptions(**{option: 8.0}))
    others = [i for i in range(len(plain.model.layers)) if i != layer]
    for i in others:
        np.testing.assert_array_equal(np.array(loud.model.layers[i].attn.wo_a.weight),
                                      np.array(plain.model.layers[i].attn.wo_a.weight))
    before, after = (np.array(t.model.layers[layer].attn.wo_a.weight) for t in (plain, loud))
    hd = loud.cfg["head_dim"]
    np.testing.assert_allclose(after[0, :, :hd], 8 * before[0, :, :hd], rtol=1e-6)
    np.testing.assert_array_equal(after[0, :, hd:], before[0, :, hd:])
    np.testing.assert_array_equal(after[1:], before[1:])
    # through the layer: head 0's output 8 times as loud, the other heads' as before
    attn_plain, attn_loud = plain.model.layers[layer].attn, loud.model.layers[layer].attn
    heads = mx.array(np.random.default_rng(0).normal(size=(1, 5, plain.cfg["num_attention_heads"], hd)), mx.float32)
    first = mx.array(np.arange(heads.shape[2]) == 0, mx.float32)[:, None]
    np.testing.assert_allclose(np.array(attn_loud._output(heads * first, 0)),
                               8 * np.array(attn_plain._output(heads * first, 0)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(attn_loud._output(heads * (1 - first), 0)),
                               np.array(attn_plain._output(heads * (1 - first), 0)), rtol=1e-5, atol=1e-6)


def test_init_from_starts_at_a_runs_weights(tmp_path):
    tokenizer = load_tokenizer(None)
    first = Trainer(tokenizer, TrainOptions(steps=2, max_tokens=256, warmup=1, lr=1e-2))
    first.train_step()
    first.save_official(tmp_path / "a")
    saved, _, _ = load_run(tmp_path / "a")
    follow = Trainer(tokenizer, TrainOptions(init_from=str(tmp_path / "a"), copy_head_scale=4.0, seed=5))
    layer = follow.options.copy_layer
    ours, theirs = (dict(tree_flatten(m.parameters())) for m in (follow.model, saved))
    hd = follow.cfg["head_dim"]
    for name, value in theirs.items():
        if name == f"layers.{layer}.attn.wo_a.weight":
            np.testing.assert_allclose(np.array(ours[name])[0, :, :hd], 4 * np.array(value)[0, :, :hd], rtol=1e-6)
            np.testing.assert_array_equal(np.array(ours[name])[:, :, hd:], np.array(value)[:, :, hd:])
        else:
            np.testing.assert_array_equal(np.array(ours[name]), np.array(value), err_msg=name)
    assert follow.step == 0 and follow.train_step()["step"] == 0  # a fresh schedule
    with pytest.raises(ValueError, match="o_lora_rank"):
        Trainer(tokenizer, TrainOptions(init_from=str(tmp_path / "a"), config={"o_lora_rank": 64}))


def test_embedding_learning_rate_scale():
    changes = []
    for scale in (1.0, 4.0):
        trainer = Trainer(load_tokenizer(None), TrainOptions(embed_lr_scale=scale, lr=1e-3, warmup=1, max_tokens=256))
        embed, wkv = np.array(trainer.model.embed.weight), np.array(trainer.model.layers[0].attn.wkv.weight)
        trainer.train_step()
        changes.append((np.abs(np.array(trainer.model.embed.weight) - embed).max(),
                        np.abs(np.array(trainer.model.layers[0].attn.wkv.weight) - wkv).max()))
    # the same first step (same batch, same gradients): Adam's moves scale with the learning rate
    assert changes[1][0] == pytest.approx(4 * changes[0][0], rel=1e-4)
    assert changes[1][1] == pytest.approx(changes[0][1], rel=1e-4)


def test_train_tiny_takes_the_guidance_options(tmp_path):
    from mlx_dsv4.cli import main

    assert main(["train-tiny", str(tmp_path), "--steps", "1", "--mix", "copy=1", "--guide-weight", "0.5",
                 "--copy-output-weight", "0.25", "--copy-value-weight", "0.5", "--head-from-embed", "--tie-head",
                 "--embed-scale", "2", "--entry-guide-weight", "0.75", "--key-guide-weight", "0.5",
                 "--argument-weight", "2", "--retrieval-questions", "3", "--key-output-weight", "0.5",
                 "--key-readback-weight", "0.25", "--entry-key-weight", "0.5", "--entry-value-weight", "0.25",
                 "--answer-output-weight", "0.75", "--answer-attention-weight", "0.5", "--answer-head-scale", "2",
                 "--argument-guide-weight", "0.25", "--spell-head", "2", "--head-sample", "64",
                 "--composed-questions", "0.5", "--filler-leads", "0.25"]) == 0
    options = json.loads((tmp_path / "train_options.json").read_text())
    names = ("guide_weight", "copy_output_weight", "copy_value_weight", "head_from_embed", "tie_head",
             "entry_guide_weight", "key_guide_weight", "argument_weight", "retrieval_questions", "key_output_weight",
             "key_readback_weight", "entry_key_weight", "entry_value_weight", "answer_output_weight",
             "answer_attention_weight", "answer_head_scale", "argument_guide_weight", "spell_head", "head_sample",
             "composed_questions", "filler_leads")
    assert tuple(options[name] for name in names) == (0.5, 0.25, 0.5, True, True, 0.75, 0.5, 2, 3, 0.5, 0.25, 0.5, 0.25,
                                                      0.75, 0.5, 2.0, 0.25, 2, 64, 0.5, 0.25)
    record = json.loads((tmp_path / "loss.jsonl").read_text().splitlines()[0])
    assert record["guide"] > 0 and record["copy_output"] > 0 and record["copy_value"] > 0 and record["key_guide"] > 0
    assert record["key_output"] > 0 and record["key_readback"] > 0

    # benchmarks/tool_progress.py reads such a run directory
    progress_path = Path(__file__).parent.parent / "benchmarks" / "tool_progress.py"
    spec = importlib.util.spec_from_file_location("tool_progress", progress_path)
    tool_progress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool_progress)
    result = tool_progress.row(tmp_path, load_tokenizer(None), calls_n=2, tool_n=1)
    assert result["calls"]["arguments_tokens"] > 0 and 0 <= result["calls"]["arguments"] <= 1
    cells = tool_progress.markdown("run", result).strip("| ").split(" | ")
    assert len(cells) == 12 and cells[0] == "run" and all(c.endswith("%") or "/" in c or c == "-" for c in cells[2:])
    assert float(cells[1]) == pytest.approx(record["main"], abs=5e-4)  # the one step it ran
    log = tmp_path / "loss.jsonl"
    log.write_text("".join(json.dumps({"main": m, "kinds": k}) + "\n" for m, k in
                           [(9.0, ["tool"]), (5.0, ["retrieval"]), (3.0, ["chat", "tool"]), (1.0, ["name"])]))
    assert tool_progress.training_loss(tmp_path, 2) == pytest.approx(2.0)  # the retrieval step is left out
    assert tool_progress.training_loss(tmp_path, 10) == pytest.approx(13.0 / 3)

    # benchmarks/copy_probe.py reads such a run directory
    probe_path = Path(__file__).parent.parent / "benchmarks" / "copy_probe.py"
    spec = importlib.util.spec_from_file_location("copy_probe", probe_path)
    copy_probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy_probe)
    model, _, options = load_run(tmp_path)
    result, norms = copy_probe.probe(model, load_tokenizer(None), options.copy_layer, examples=2)
    assert result["number"]["targets"] > 0 and result["other"]["targets"] > 0
    assert result.get(copy_probe.CONTINUED, {"targets": 0})["targets"] < result["number"]["targets"]  # a subset
    for row in result.values():
        assert 0 < row["attention_on_sources"] < 1 and 0 <= row["greedy_right"] <= 1
        assert 0 <= row["copy_head_right"] <= 1
    assert options.tie_head and options.embed_scale == 2.0
    rows = copy_probe.number_rows(model, load_tokenizer(None))
    assert rows["numbers"] == 900  # each of 100-999 is one token
    assert rows["head_row_embedding_cosine"] == pytest.approx(1.0, abs=1e-5)  # a tied head
    assert norms["targets"] == result["number"]["targets"]
    assert all(0 < norms[k] < np.inf for k in ("copy_head", "attention", "feed_forward_write", "final_features"))
    ret = copy_probe.retrieval_probe(model, load_tokenizer(None), n_tokens=600, examples=1)
    assert ret["top_k"] == 16 and 16 < ret["entries"] < 600 // 4 and ret["greedy_right"] in (0.0, 1.0)
    assert ret["head_right"] in (0.0, 1.0)
    assert (ret["median_rank"] < ret["top_k"]) == (ret["picked"] == 1.0)  # in the top-k when ranked there
    assert ret["picked_next"] in (0.0, 1.0)
    assert ret["picked"] or ret["attention_mass"] == 0.0  # attention reaches only the picked entries
    shares = copy_probe.identity_by_layer(model, load_tokenizer(None), examples=1, tokens=800)
    assert len(shares) == 4 and shares[0] > 0.9  # layer 0 reads the embedding itself
    at_key = copy_probe.key_readback(model, load_tokenizer(None), examples=1, tokens=800, offset=0)
    at_value = copy_probe.key_readback(model, load_tokenizer(None), examples=1, tokens=800)
    assert at_key["layer 0 input"] > 0.9 and at_value["layer 0 input"] < 0.1  # the key's own embedding, not the value's
    assert set(at_value) == {"layer 0 input", "layer 1 input", "layer 2 input", "layer 3 input", "CSA entry",
                             "indexer key", "key-mover head output", "key-mover attention on the key",
                             "CSA entry, the line's value"}
    assert 0 < at_value["key-mover attention on the key"] < 1
    asked_at_key = copy_probe.answer_key_readback(model, load_tokenizer(None), lists=2, tokens=800, questions=64,
                                                  offset=0)
    asked = copy_probe.answer_key_readback(model, load_tokenizer(None), lists=2, tokens=800, questions=64)
    assert asked_at_key["layer 0 input"] > 0.9 and asked["layer 0 input"] < 0.1  # "</think>" itself holds no key


def test_entry_guidance_reads_the_answers_compressed_entries():
    """The retrieval guidance: its target entries hold the asked key's value, its terms equal a direct
    float64 computation of the first head's and the indexer's dense softmax over the entries the
    answer position sees, and steps on its gradient lower it."""
    tokenizer = load_tokenizer(None)
    options = TrainOptions(seed=0, mix={"retrieval": 1.0}, retrieval_tokens=(600, 700), entry_guide_weight=1.0,
                           lr=1e-2, warmup=1)
    trainer = Trainer(tokenizer, options)
    batch, kinds = trainer.batch()
    assert kinds == ["retrieval"]
    ids = np.array(batch["tokens"][0])
    (query, held), = batch["entry_query"]
    assert tokenizer.decode(ids[query - 3: query + 2].tolist()).startswith(tokenizer.decode([int(ids[query - 3])]))
    source = retrieval_source(ids, query)
    line = tokenizer.decode(ids[source - 3: source + 1].tolist())
    assert line == f"{tokenizer.decode([int(ids[query - 3])])}: {tokenizer.decode([int(ids[query + 1])])}"
    assert held == [source // 4]
    with pytest.raises(ValueError, match="0 lines start with the asked key"):
        retrieval_source(np.where(np.arange(len(ids)) == source, ids[source] + 1, ids), query)
    # the asked key's token also written as an earlier line's value ("K" after ": ") does not mislead it
    values = np.nonzero(ids == ids[source - 2])[0] + 2  # after each ":" and " "
    decoy = ids.copy()
    decoy[values[values < source - 3][0]] = ids[query - 3]
    assert retrieval_source(decoy, query) == source

    records = {}
    fast.trunk(trainer.model, batch["tokens"], records)
    (csa, r), = [(i, r) for i, r in records.items() if "iq" in r]
    scale, ratio = trainer.model.layers[csa].attn.scale, trainer.model.layers[csa].attn.ratio
    assert ratio == 4
    got = float(entry_guide_loss(r["q"], r["entries"], r["keys"], r["iq"], r["iw"], query, held, scale, ratio))
    visible = np.arange(r["entries"].shape[1]) < (query + 1) // 4
    q, entries = np.array(r["q"][0, query, 0], np.float64), np.array(r["entries"][0], np.float64)
    iq, iw = np.array(r["iq"][0, query], np.float64), np.array(r["iw"][0, query], np.float64)
    keys = np.array(r["keys"][0].astype(mx.float32), np.float64)
    expected = 0.0
    for scores in (entries @ q * scale, (np.maximum(iq @ keys.T, 0) * iw[:, None]).sum(0)):
        p = np.exp(scores[visible] - scores[visible].max())
        p /= p.sum()
        expected -= np.log(p[held].sum())
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected > 2 * np.log(visible.sum() / 2) - 3  # an untrained model: near the uniform mass

    args = [batch[k] for k in ("tokens", "main_pos", "main_targets", "mtp_pos", "mtp_targets", "index_pos",
                                "copy_queries", "copy_masks", "value_pos", "entry_query")]
    seen = []
    for _ in range(6):  # steps on this batch: the objective's gradient moves the entries' mass up
        (_, parts), grads = trainer._grad(trainer._joint, *args)
        trainer.optimizer.update(trainer._joint, grads)
        mx.eval(trainer._joint.parameters(), trainer.optimizer.state)
        seen.append(float(parts["entry_guide"]))
    assert seen[0] == pytest.approx(got, rel=1e-4)
    assert seen[-1] < got - 1.0, seen


@pytest.mark.parametrize("spell_head", [0, 1])
def test_argument_guide_reads_the_copy_heads_attention_on_the_questions_tokens(spell_head):
    """The argument guidance: -log of the copy head's attention (the spell head's where the token is
    spelled from others) on each argument token's sources in the question, checked against a direct
    softmax, plus the spell head's own naming of the spelled ones; the rare tokens it spells from are
    not also named as themselves, and steps lower it."""
    tokenizer = load_tokenizer(None)
    options = TrainOptions(steps=8, mix={"tool": 1.0}, argument_guide_weight=1.0, copy_value_weight=1.0, copy_layer=0,
                           spell_head=spell_head, lr=1e-2, warmup=1, max_tokens=1024)
    trainer = Trainer(tokenizer, options)
    batch, kinds = trainer.batch()
    arguments, tokens = batch["arguments"], batch["tokens"]
    assert set(kinds) == {"tool"} and len(arguments["queries"]) > arguments["changed"].sum() > 0
    spelled_queries = set(arguments["queries"][arguments["changed"]])
    assert len(arguments["spelled"]) > 0 and set(arguments["spelled"]) <= spelled_queries
    names = ("tokens", "main_pos", "main_targets", "mtp_pos", "mtp_targets", "index_pos", "copy_queries", "copy_masks",
             "value_pos", "entry_query", "key_pos", "entry_keys", "arguments")
    (_, parts), _ = trainer._grad(trainer._joint, *(batch[k] for k in names))
    model, a = trainer.model, trainer.model.args
    layer = model.layers[0]
    xin, _, _ = layer._attn_input(expand(model.embed(tokens), a.hc_mult), split_options(a))
    dense = _dense_attention(layer.attn, xin)
    block = fast.block_size(a.sliding_window)
    on = [dense[j, spell_head if changed else 0, np.nonzero(row)[0] + (j // block - 1) * block].sum()
          for j, row, changed in zip(arguments["queries"], arguments["masks"], arguments["changed"])]
    records = {}
    fast.trunk(model, tokens, records, probs_of=(0,))
    naming = copy_output_loss(model, 0, records[0]["heads"], tokens, arguments["spelled"], trainer._head(model),
                              index=spell_head)
    assert float(parts["argument_guide"]) == pytest.approx(-np.mean(np.log(np.array(on) + 1e-6)) + float(naming),
                                                           rel=1e-4)
    ids = np.array(tokens[0])
    spelled_from = [np.nonzero(arguments["masks"][list(arguments["queries"]).index(j)])[0] + (j // block - 1) * block
                    for j in arguments["spelled"]]
    np.testing.assert_array_equal(arguments["spelled_from"], np.unique(np.concatenate(spelled_from)))
    assert not np.isin(ids[batch["value_pos"]], ids[np.concatenate(spelled_from)]).any()
    held = ids[np.concatenate(spelled_from)]
    assert np.isin(held, ids[copy_value_positions(ids, len(ids), trainer.rng)]).any()  # rare: named without it
    guides = [trainer.train_step()["argument_guide"] for _ in range(8)]
    assert np.mean(guides[-3:]) < guides[0] - 1.0, guides
