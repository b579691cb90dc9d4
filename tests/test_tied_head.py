"""Checkpoints with tie_word_embeddings: the head reads the embedding, no head.weight is stored, and
the logits are the reference's; a trained run whose head is its scaled embedding ships tied."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_dsv4
from conftest import PARITY_VOCAB
from mlx_dsv4.convert.convert import convert
from mlx_dsv4.convert.reader import read_header
from mlx_dsv4.convert.recipes import Recipe
from mlx_dsv4.tiny import write_tiny_checkpoint
from mlx_dsv4.train.ship import tied_checkpoint
from parity import reference_logits, rel_err

TOKENS = np.random.default_rng(5).integers(0, PARITY_VOCAB, (1, 300))


def stored_names(directory):
    names = set()
    for f in directory.glob("*.safetensors"):
        names |= set(read_header(f))
    return names


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tied") / "flash", seed=4, vocab_size=PARITY_VOCAB,
                                 tie_word_embeddings=True)


def logits(model, tokens=TOKENS):
    return np.array(model(mx.array(tokens), cache=model.make_cache("float", "float")).astype(mx.float32))


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_tied_checkpoint_matches_the_reference(tmp_path, preset):
    path = write_tiny_checkpoint(tmp_path / preset, preset=preset, seed=2, vocab_size=PARITY_VOCAB,
                                 tie_word_embeddings=True)
    assert "head.weight" not in stored_names(path) and "embed.weight" in stored_names(path)
    model = mlx_dsv4.load_model(path)
    assert not any(k.startswith("head") for k in dict(model.parameters()))
    assert rel_err(logits(model), reference_logits(str(path), TOKENS)) < 1e-3


def test_a_tied_checkpoint_given_a_head_is_named_unexpected(tied, tmp_path):
    import shutil

    from mlx_dsv4.loader import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(tied, bad)
    weights = mx.load(str(bad / "model.safetensors"))
    weights["head.weight"] = weights["embed.weight"]
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): head\.weight"):
        mlx_dsv4.load_model(bad)


def test_quantised_tied_head_reads_the_quantised_embedding(tied, tmp_path):
    out = tmp_path / "q"
    convert(tied, out, Recipe("q8", dense_bits=None, embed_bits=4, dtype="bfloat16"), progress=False,
            log=lambda s: None)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert not any(n.startswith("head.") for n in stored_names(out))
    model = mlx_dsv4.load_model(out, mtp=True)
    e = model.embed
    x = mx.random.normal((3, model.args.hidden_size)).astype(mx.bfloat16)
    want = mx.quantized_matmul(x, e.weight, e.scales, e.biases, transpose=True, group_size=e.group_size, bits=4)
    assert mx.array_equal(model.head(x), want)
    # the MTP layer drafts through the same head
    hidden = model(mx.array(TOKENS[:, :8]), return_hidden=True)[1]
    mtp = model.mtp_layers[0]
    draft, _ = mtp(hidden, mx.array(TOKENS[:, 1:9]), model.embed, model.head, mtp.make_cache("float", "float"))
    assert draft.shape == (1, 8, PARITY_VOCAB) and bool(mx.all(mx.isfinite(draft.astype(mx.float32))))


def untied_copy(tied_dir, out, scale):
    """`tied_dir`'s model as a trained run writes it: a head of its own, the embedding times `scale`,
    and the final norms without it."""
    out.mkdir()
    config = json.loads((tied_dir / "config.json").read_text())
    weights = mx.load(str(tied_dir / "model.safetensors"))
    weights["head.weight"] = weights["embed.weight"] * scale
    for name in ("norm.weight", "mtp.0.norm.weight"):
        weights[name] = weights[name] / scale
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return out


@pytest.mark.parametrize("scale", [2.0 ** -8, 0.37])
def test_a_run_whose_head_is_its_scaled_embedding_ships_tied(tied, tmp_path, scale):
    run = untied_copy(tied, tmp_path / "run", scale)
    assert tied_checkpoint(run, tmp_path / "tied")
    assert "head.weight" not in stored_names(tmp_path / "tied")
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    want, got = mlx_dsv4.load_model(run, mtp=True), mlx_dsv4.load_model(tmp_path / "tied", mtp=True)
    assert rel_err(logits(got), logits(want)) < 1e-5
    hidden = want(mx.array(TOKENS[:, :8]), return_hidden=True)[1]
    drafts = [m.mtp_layers[0](hidden, mx.array(TOKENS[:, 1:9]), m.embed, m.head, m.mtp_layers[0].make_cache())[0]
              for m in (want, got)]
    assert rel_err(np.array(drafts[1]), np.array(drafts[0])) < 1e-5


def test_a_run_with_a_head_of_its_own_ships_untied(tied, tmp_path):
    run = untied_copy(tied, tmp_path / "run", 0.5)
    weights = mx.load(str(run / "model.safetensors"))
    weights["head.weight"] = weights["head.weight"] + 1e-3 * mx.random.normal(weights["head.weight"].shape)
    mx.save_safetensors(str(run / "model.safetensors"), weights)
    assert not tied_checkpoint(run, tmp_path / "tied")
    assert not (tmp_path / "tied").exists()


def test_mlx_lm_loads_a_tied_checkpoint_with_the_same_logits(tmp_path):
    from mlx_lm import load as mlx_lm_load

    path = write_tiny_checkpoint(tmp_path / "tiny", dtype="bfloat16", mlx_lm=True, tie_word_embeddings=True)
    assert "head.weight" not in stored_names(path)
    theirs, _ = mlx_lm_load(str(path), trust_remote_code=True)
    ours = mlx_dsv4.load_model(path)
    ids = mx.array([[0, 128803, 19923, 1031, 128804, 128822]])
    assert mx.array_equal(theirs(ids, cache=theirs.make_cache()), ours(ids))


def test_the_pipeline_estimate_puts_the_embedding_on_the_last_rank_too():
    from mlx_dsv4.convert.estimate import rank_shares
    from mlx_dsv4.tiny import tiny_config

    recipe = Recipe("q8", dense_bits=None, embed_bits=4, dtype="bfloat16")
    untied, tied = (rank_shares(tiny_config("flash", tie_word_embeddings=t), recipe, 4096, 2)["pipeline"]
                    for t in (False, True))
    assert [r.part for r in tied] == [r.part for r in untied]
    assert tied[0].weights == untied[0].weights  # the embedding, and the first layers
    assert tied[-1].weights == untied[-1].weights  # the head's bytes are the embedding's, held again
