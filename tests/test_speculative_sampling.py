"""Speculative sampling keeps the target distribution: the acceptance rule alone, on a small
vocabulary, and the whole generation on the tiny model, both against exact probabilities."""

import mlx.core as mx
import numpy as np

from generate_support import tiny_chat_model
from mlx_dsv4.generate import generate
from mlx_dsv4.speculative import Drafting, accept_drafts, sampling_distribution

# chi-square critical values at significance 0.001
CRITICAL = {5: 20.515, 8: 26.124}


def chi_square(counts, probs):
    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum())


def test_the_acceptance_rule_emits_the_target_distribution():
    rng = np.random.default_rng(0)
    vocab, k, trials = 6, 3, 3000
    p = rng.dirichlet(np.ones(vocab), size=k + 1)
    p[:, 5] = 0  # a token the target's top-k removed
    p /= p.sum(1, keepdims=True)
    q = rng.dirichlet(np.ones(vocab) * 0.5, size=k)  # a drafter that disagrees, and proposes token 5 too
    p_mx, q_mx = mx.array(p, dtype=mx.float32), mx.array(q, dtype=mx.float32)
    mx.random.seed(1)
    first, second = np.zeros(vocab), np.zeros(vocab)
    for _ in range(trials):
        drafts = [int(mx.random.categorical(mx.log(q_mx[i])).item()) for i in range(k)]
        a, following = accept_drafts(drafts, q_mx, p_mx)
        emitted = drafts[:a] + [following]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    assert chi_square(first, p[0]) < CRITICAL[5]
    assert chi_square(second, p[1]) < CRITICAL[5]
    # the test can tell: the drafter's own distribution is far off
    assert chi_square(first[:5], q[0][:5] / q[0][:5].sum()) > 10 * CRITICAL[5]


def test_sampling_distribution_is_what_plain_sampling_draws_from():
    logits = mx.array([[2.0, 1.0, 0.5, -1.0, -3.0, 0.0]])
    dist = sampling_distribution(0.7, top_k=3)(logits)[0]
    assert (np.array(dist) > 0).sum() == 3
    top = np.array([2.0, 1.0, 0.5]) / 0.7
    assert np.allclose(np.array(dist)[[0, 1, 2]], np.exp(top) / np.exp(top).sum(), atol=1e-6)
    assert sampling_distribution(0.0) is None


def test_speculative_sampling_gives_the_distribution_of_plain_sampling():
    model, tok = tiny_chat_model()
    prompt = tok.encode("Sampled speculation")
    distribution = sampling_distribution(1.0, top_k=3)

    def next_probs(ids):
        logits = model(mx.array([ids]), model.make_cache())[0, -1]
        return np.array(distribution(logits))

    first = next_probs(prompt)
    support = [int(t) for t in np.nonzero(first)[0]]
    joint = {(a, b): first[a] * pb for a in support for b, pb in enumerate(next_probs(prompt + [a])) if pb > 0}
    cells = sorted(joint)
    assert len(cells) == 9

    # The generation's own loop, with the prompt prefilled once: each run restores the caches,
    # samples the first token and runs one speculative round of two drafts. The random drafter
    # proposes tokens the target never samples, so its first draft is replaced by the target's
    # likeliest token, which is then accepted or rejected by the same rule.
    likeliest = {a: max((b for (x, b) in cells if x == a), key=lambda b: joint[(a, b)]) for a in support}

    def propose_likely(tokens, drafts):
        return [likeliest[tokens[-1]]] + drafts[1:]

    drafting = Drafting(model, model.make_cache(), distribution=distribution)
    drafting.adjust_drafts = propose_likely
    logits = drafting.prefill(prompt, 2048)
    start = (drafting.cache.to_state(), drafting.draft_cache.to_state(), drafting.last_hidden, list(drafting.tokens))
    mx.random.seed(3)
    counts = dict.fromkeys(cells, 0)
    runs = 300
    for _ in range(runs):
        drafting.cache.load_state(*start[0])
        drafting.draft_cache.load_state(*start[1])
        drafting.last_hidden, drafting.tokens = start[2], list(start[3])
        t1 = drafting.first_token(logits)
        t2 = drafting.round(t1, 2)[0][0]
        counts[(t1, t2)] += 1
    stat = chi_square([counts[c] for c in cells], [joint[c] for c in cells])
    print(f"\n(t1, t2) over {runs} speculative rounds: chi-square {stat:.1f} (df 8), "
          f"{drafting.accepted} of {drafting.proposed} drafts accepted")
    assert stat < CRITICAL[8]
    assert 0 < drafting.accepted < runs  # both acceptance and rejection were taken
    # and through generate: sampled speculative decoding runs to the end with its figures
    out = generate(model, tok, prompt, max_tokens=12, temperature=1.0, top_k=3, seed=0, eos_token_ids=(),
                   draft="mtp", num_draft=3)
    assert len(out.tokens) == 12 and out.stats["draft_proposed"] > 0
