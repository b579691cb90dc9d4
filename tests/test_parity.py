"""Same weights in, same logits out: MLX model vs transformers' DeepseekV4ForCausalLM."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_dsv4
from conftest import PARITY_VOCAB
from parity import reference_logits, rel_err

SEQ = 640  # five ratio-128 entries, 160 ratio-4 entries against index_topk = 16
TOL = 1e-3


def exact_cache(model):
    """Cache storage in the model's own dtype: the reference keeps float32 kv."""
    return model.make_cache(kv_dtype="float", index_dtype="float")


@pytest.fixture(scope="module", params=["flash", "pro"])
def case(request, tiny_dirs):
    path = tiny_dirs[request.param]
    rng = np.random.default_rng(123)
    tokens = rng.integers(0, PARITY_VOCAB, (2, SEQ))
    ref = reference_logits(path, tokens)
    return path, mlx_dsv4.load_model(path), tokens, ref


def test_sequence_exercises_compression(case):
    path, model, tokens, ref = case
    args = model.args
    assert 4 in args.compress_ratios and 128 in args.compress_ratios
    assert SEQ // 128 >= 4
    assert SEQ // 4 > 4 * args.index_topk  # the indexer must really drop entries
    assert args.num_hash_layers >= 1 and args.yarn is not None


def test_prefill_one_shot(case):
    _, model, tokens, ref = case
    ours = np.array(model(mx.array(tokens[:1]), cache=exact_cache(model)))
    assert rel_err(ours, ref[:1]) < TOL


def test_batch_of_two(case):
    _, model, tokens, ref = case
    ours = np.array(model(mx.array(tokens), cache=exact_cache(model)))
    assert rel_err(ours[0], ref[0]) < TOL
    assert rel_err(ours[1], ref[1]) < TOL


def test_prefill_uneven_chunks(case):
    _, model, tokens, ref = case
    cache = exact_cache(model)
    outs, start = [], 0
    while start < SEQ:
        piece = tokens[1:, start : start + 77]
        outs.append(np.array(model(mx.array(piece), cache=cache)))
        start += 77
    assert cache.offset == SEQ
    assert rel_err(np.concatenate(outs, axis=1), ref[1:]) < TOL


def test_prefill_then_decode(case):
    _, model, tokens, ref = case
    n_prefill = SEQ - 64 - 5  # decoding crosses ratio-4 and ratio-128 window boundaries
    cache = exact_cache(model)
    outs = [np.array(model(mx.array(tokens[:1, :n_prefill]), cache=cache))]
    for t in range(n_prefill, SEQ):
        outs.append(np.array(model(mx.array(tokens[:1, t : t + 1]), cache=cache)))
    ours = np.concatenate(outs, axis=1)
    assert ours.shape == ref[:1].shape
    assert rel_err(ours[:, n_prefill:], ref[:1, n_prefill:]) < TOL
    assert rel_err(ours, ref[:1]) < TOL


def test_reference_cache_path_agrees(tiny_dirs):
    """The reference's own chunked path matches its one-shot path, so chunk tests compare like with like."""
    path = tiny_dirs["flash"]
    tokens = np.random.default_rng(7).integers(0, PARITY_VOCAB, (1, 300))
    one_shot = reference_logits(path, tokens)
    chunked = reference_logits(path, tokens, chunks=[77, 77, 77, 69])
    assert rel_err(chunked, one_shot) < TOL
    model = mlx_dsv4.load_model(path)
    cache = exact_cache(model)
    ours = np.concatenate(
        [np.array(model(mx.array(tokens[:, s : s + n]), cache=cache)) for s, n in [(0, 77), (77, 77), (154, 77), (231, 69)]],
        axis=1,
    )
    assert rel_err(ours, chunked) < TOL
