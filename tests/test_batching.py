"""Continuous batching: a batched decode step equals solo steps, and the server decodes
concurrent requests together with each one's solo output."""

import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from test_server_support import MODEL, ServerProcess

# Rows of different lengths; the 127- and 255-token rows cross the 128-token compression
# boundary while decoding, the others hold HCA/CSA entries from their prefill.
ROW_LENGTHS = (5, 127, 130, 255)
STEPS = 4


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_batched_step_gives_the_logits_of_solo_steps(tiny_dirs, preset):
    from mlx_dsv4 import load
    from mlx_dsv4.batch import decode_rows

    model, _ = load(tiny_dirs[preset])
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, model.args.vocab_size, n).tolist() for n in ROW_LENGTHS]

    def prefilled():
        caches = []
        for ids in prompts:
            cache = model.make_cache()
            model(mx.array([ids[:-1]]), cache=cache)
            mx.eval(cache.state())
            caches.append(cache)
        return caches

    batched_caches, solo_caches = prefilled(), prefilled()
    hca = model.args.compress_ratios.index(128)
    assert [c.layers[hca].compressor.n_entries for c in solo_caches] == [0, 0, 1, 1]
    tokens = [ids[-1] for ids in prompts]
    for _ in range(STEPS):
        batched = decode_rows(model, tokens, batched_caches)
        solo = mx.concatenate([model(mx.array([[t]]), cache=c)[:, -1] for t, c in zip(tokens, solo_caches)])
        assert batched.shape == solo.shape == (len(prompts), model.args.vocab_size)
        np.testing.assert_allclose(np.array(batched), np.array(solo), rtol=1e-5, atol=1e-5)
        assert mx.array_equal(mx.argmax(batched, axis=-1), mx.argmax(solo, axis=-1)).item()
        tokens = mx.argmax(solo, axis=-1).tolist()
    assert [c.offset for c in batched_caches] == [c.offset for c in solo_caches] == [n + STEPS - 1 for n in ROW_LENGTHS]
    for batched_cache, solo_cache in zip(batched_caches, solo_caches):
        for a, b in zip(batched_cache.state(), solo_cache.state()):
            assert mx.array_equal(a, b).item()


def test_decode_rows_refuses_mismatched_rows(tiny_dirs):
    from mlx_dsv4 import load
    from mlx_dsv4.batch import decode_rows

    model, _ = load(tiny_dirs["flash"])
    with pytest.raises(ValueError, match="2 tokens for 1 caches"):
        decode_rows(model, [1, 2], [model.make_cache()])


PROMPTS = [
    "Short one.",
    "A somewhat longer request about the weather in Paris and what to wear there. " * 3,
    "Count the words of this sentence, then explain how. " * 8,
    "Tell a story. " * 20,
]
MAX_TOKENS = 48
CANCELLED = 2  # the request whose client closes its stream midway


SEEDED = [("Pick some words at random.", 11), ("Pick some words at random.", 12)]


def _stream(server, prompt, read_at_most=None, seed=None, before_close=None):
    """(text, finish_reason) of one streaming request, greedy (sampled at temperature 1 with
    ``seed``); with ``read_at_most`` the client closes the stream after that many chunks (once
    ``before_close()`` returns)."""
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=120)
    sampling = dict(temperature=0) if seed is None else dict(temperature=1.0, seed=seed)
    stream = client.chat.completions.create(model=MODEL, stream=True, max_tokens=MAX_TOKENS, **sampling,
                                            messages=[{"role": "user", "content": prompt}])
    pieces, reason = [], None
    for n, chunk in enumerate(stream):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
        if read_at_most is not None and n + 1 >= read_at_most:
            if before_close is not None:
                before_close()
            stream.close()
            break
    return "".join(pieces), reason


def _concurrently(fns):
    results, errors = [None] * len(fns), []
    start = threading.Barrier(len(fns))

    def run(i):
        try:
            start.wait()
            results[i] = fns[i]()
        except Exception as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


@pytest.fixture(scope="module")
def solo_outputs():
    server = ServerProcess(["--served-model-name", MODEL, "--max-batch", "1", "--prompt-cache-dir", "none"])
    try:
        outputs = [_stream(server, p) for p in PROMPTS]
        seeded = [_stream(server, p, seed=seed) for p, seed in SEEDED]
        assert server.health()["batch"] == {"max": 1, "decoding": 0, "largest": 0}
        return outputs, seeded
    finally:
        server.stop()


def test_concurrent_streams_decode_together_with_their_solo_outputs(solo_outputs):
    solo_outputs, solo_seeded = solo_outputs
    assert len(set(solo_outputs)) == len(PROMPTS)  # distinct outputs: nothing could pass by mixing rows
    server = ServerProcess(["--served-model-name", MODEL, "--max-batch", "4", "--prompt-cache-dir", "none"])

    def all_four_joined(timeout=60):
        # on a loaded machine the last request can reach the server late: the client that leaves
        # early waits for it, so that the batch did hold all four streams at once
        deadline = time.monotonic() + timeout
        while server.health()["batch"]["largest"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        fns = [lambda p=p, i=i: _stream(server, p, read_at_most=6 if i == CANCELLED else None,
                                        before_close=all_four_joined if i == CANCELLED else None)
               for i, p in enumerate(PROMPTS)]
        outputs = _concurrently(fns)
        for i, (output, solo) in enumerate(zip(outputs, solo_outputs)):
            if i == CANCELLED:
                assert solo[0].startswith(output[0])
            else:
                assert output == solo, (i, output, solo)
        health = server.health()
        assert health["batch"]["max"] == 4
        assert health["batch"]["largest"] == 4, health
        assert health["completed"] == 3 and health["cancelled"] == 1, health
        assert health["batch"]["decoding"] == 0 and health["pending"] == 0
        # the server goes on serving after the batch drained
        assert _stream(server, PROMPTS[0]) == solo_outputs[0]
        # each seeded request samples from its own random state, whatever decodes beside it
        assert solo_seeded[0] != solo_seeded[1]
        assert _concurrently([lambda p=p, s=s: _stream(server, p, seed=s) for p, s in SEEDED]) == solo_seeded
        assert server.health()["batch"]["largest"] == 4
    finally:
        server.stop()


def test_prefix_cache_hits_with_batching():
    import openai

    server = ServerProcess(["--served-model-name", MODEL, "--max-batch", "4"])
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=120)
        conversations = [[{"role": "user", "content": f"Conversation {c}: " + "tell me more. " * (10 + 15 * c)}]
                         for c in range(3)]

        def turn(messages):
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
            return reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens, \
                reply.choices[0].message.content

        first = _concurrently([lambda m=m: turn(m) for m in conversations])
        assert server.health()["batch"]["largest"] >= 2
        for messages, (_, _, text) in zip(conversations, first):
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
        second = _concurrently([lambda m=m: turn(m) for m in conversations])
        for (prompt_1, _, _), (prompt_2, cached_2, _) in zip(first, second):
            # the whole first turn, reply included, comes from the prompt cache
            assert cached_2 >= prompt_1, (first, second)
            assert prompt_2 > cached_2
    finally:
        server.stop()


def test_health_never_shows_a_finished_generation_still_decoding():
    """Each outcome is counted only after its generation left the batch's decoding count, so that
    /health never reads a completed or cancelled generation as still decoding."""
    import threading
    from types import SimpleNamespace

    from mlx_dsv4.server.engine import Engine

    class Batch:
        def __init__(self, runs):
            self.runs = list(runs)

        def __len__(self):
            return len(self.runs)

        def remove(self, run, keep=True):
            self.runs.remove(run)

        def step(self):  # "done" finishes; the others take a token
            self.runs.remove(done)
            return [(run, SimpleNamespace(finish_reason="stop" if run is done else None))
                    for run in (done, cancelled_in_step)]

    def job():
        return SimpleNamespace(cancelled=threading.Event(), put=lambda *item: None)

    done, cancelled_before, cancelled_in_step, going_on = (object() for _ in range(4))
    jobs = {run: job() for run in (done, cancelled_before, cancelled_in_step, going_on)}
    jobs[cancelled_before].cancelled.set()
    engine = Engine.__new__(Engine)
    engine._lock, engine.pending = threading.Lock(), 4
    engine.counts = {"completed": 0, "cancelled": 0, "failed": 0}
    engine._running = {id(run): j for run, j in jobs.items()}
    engine._last_steps, engine.decoding = {}, 4
    engine.metrics = SimpleNamespace(note_step=lambda *a, **k: None, note_end=lambda *a: None)
    batch = Batch(jobs)
    seen = []
    finish = engine._finish

    def recording_finish(j, outcome):
        seen.append((outcome, engine.decoding, len(batch)))
        if j is jobs[done]:
            jobs[cancelled_in_step].cancelled.set()  # its client leaves while the step is handed out
        finish(j, outcome)

    engine._finish = recording_finish
    engine._decode_step(batch)
    assert [outcome for outcome, _, _ in seen] == ["cancelled", "completed", "cancelled"]
    assert all(decoding == size for _, decoding, size in seen), seen
    assert engine.decoding == len(batch) == 1 and batch.runs == [going_on]
    assert engine.counts == {"completed": 1, "cancelled": 2, "failed": 0} and engine.pending == 1
