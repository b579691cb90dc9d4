"""The prefix store: many conversations' prompt caches in memory, on disk, and after a restart."""

import logging
import random

import pytest

from mlx_dsv4.generate import generate
from mlx_dsv4.prefix_store import PrefixStore

BUDGET = 64 << 20


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    from mlx_dsv4 import load

    return load(tiny_dirs["flash"])


def fresh_model(tiny_dirs):
    """A second load of the same checkpoint, as a restarted process has."""
    from mlx_dsv4 import load

    return load(tiny_dirs["flash"])[0]


def words(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(100, 500) for _ in range(n)]


def turn(model, tokenizer, history, new, cache, max_tokens=6):
    """One turn: the conversation so far plus ``new`` ids; returns (ids after it, stats)."""
    prompt = history + new
    result = generate(model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=cache, eos_token_ids=())
    return prompt + result.tokens, result.stats


def alternate(model, tokenizer, view, turns=3):
    """Two conversations taking turns; (conversation, turn, prefilled, new) for every turn."""
    histories = {"a": [], "b": []}
    opening = {"a": [0] + words(1, 150), "b": [0] + words(2, 170)}
    prefilled = []
    for t in range(turns):
        for name in ("a", "b"):
            new = opening[name] if t == 0 else words(10 * ord(name) + t, 20)
            histories[name], stats = turn(model, tokenizer, histories[name], new, view)
            prefilled.append((name, t, stats["prompt_tokens"] - stats["cached_tokens"], len(new)))
    return histories, prefilled


def test_two_alternating_conversations_prefill_only_their_new_tokens(loaded, tmp_path):
    model, tokenizer = loaded
    store = PrefixStore(model, memory_bytes=BUDGET, directory=tmp_path)
    _, prefilled = alternate(model, tokenizer, store.view(None))
    print("\nprefilled per turn (conversation, turn, prefilled, new):", prefilled)
    # the first turn prefills the whole prompt, every later one only its new ids
    assert all(done == new for _, _, done, new in prefilled), prefilled


def test_after_a_restart_a_known_conversation_prefills_only_its_suffix(loaded, tiny_dirs, tmp_path):
    model, tokenizer = loaded
    store = PrefixStore(model, memory_bytes=BUDGET, directory=tmp_path)
    history, _ = turn(model, tokenizer, [], [0] + words(3, 200), store.view("k1"))
    new = words(4, 15)

    restarted = PrefixStore(fresh_model(tiny_dirs), memory_bytes=BUDGET, directory=tmp_path)
    assert restarted.stats()["snapshots"] == store.stats()["snapshots"] and restarted.stats()["in_memory"] == 0
    prompt = history + new
    cached = generate(model, tokenizer, prompt, max_tokens=8, prompt_cache=restarted.view("k1"), eos_token_ids=())
    assert cached.stats["cached_tokens"] == len(history)
    assert restarted.stats()["disk_loads"] == 1
    # the restored state continues exactly as a full prefill does
    plain = generate(model, tokenizer, prompt, max_tokens=8, eos_token_ids=())
    assert cached.tokens == plain.tokens
    # another partition does not see it
    other = generate(model, tokenizer, prompt, max_tokens=1, prompt_cache=restarted.view("k2"), eos_token_ids=())
    assert other.stats["cached_tokens"] == 0


def test_memory_and_disk_budgets_are_enforced(loaded, tmp_path):
    model, tokenizer = loaded
    probe = PrefixStore(model, memory_bytes=BUDGET)
    turn(model, tokenizer, [], [0] + words(5, 120), probe.view(None), max_tokens=1)
    one = max(e.nbytes for e in probe._entries.values())
    store = PrefixStore(model, memory_bytes=3 * one, directory=tmp_path, disk_bytes=None)
    conversations = []
    for c in range(5):
        history, _ = turn(model, tokenizer, [], [0] + words(10 + c, 120), store.view(None), max_tokens=1)
        conversations.append(history)
        stats = store.stats()
        assert stats["memory_bytes"] <= 3 * one
    assert stats["snapshots"] == 10 and stats["in_memory"] < 10  # spilled, not lost
    # the oldest conversation comes back from disk
    result = generate(model, tokenizer, conversations[0] + [7, 8], max_tokens=1, prompt_cache=store.view(None),
                      eos_token_ids=())
    assert result.stats["cached_tokens"] == len(conversations[0]) and store.stats()["disk_loads"] >= 1

    file_bytes = max(e.file_bytes for e in store._entries.values())
    small = PrefixStore(model, memory_bytes=3 * one, directory=tmp_path, disk_bytes=4 * file_bytes)
    assert small.stats()["disk_bytes"] <= 4 * file_bytes
    assert len(list(store.directory.glob("*.safetensors"))) <= 4


def test_damaged_or_foreign_files_are_skipped_and_rebuilt(loaded, tiny_dirs, tmp_path, caplog):
    model, tokenizer = loaded
    store = PrefixStore(model, memory_bytes=BUDGET, directory=tmp_path)
    histories = []
    for c in range(3):
        history, _ = turn(model, tokenizer, [], [0] + words(20 + c, 130 + 10 * c), store.view(None), max_tokens=1)
        histories.append(history)
    folder = store.directory
    by_length = {len(e.tokens): e.path for e in store._entries.values()}
    truncated, damaged = by_length[len(histories[0])], by_length[len(histories[1])]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF  # an array byte: only the checksum can tell
    damaged.write_bytes(bytes(data))
    (folder / "notes.safetensors").write_bytes(b"not a cache at all")
    (folder / "readme.txt").write_text("left alone")

    caplog.set_level(logging.WARNING, logger="mlx_dsv4.prefix_store")
    restarted = PrefixStore(fresh_model(tiny_dirs), memory_bytes=BUDGET, directory=tmp_path)
    assert "truncated" in caplog.text and "notes.safetensors" in caplog.text
    view = restarted.view(None)
    results = [generate(model, tokenizer, h + [9], max_tokens=1, prompt_cache=view, eos_token_ids=()) for h in histories]
    assert results[0].stats["cached_tokens"] < len(histories[0])  # truncated: rebuilt from a shorter prefix or none
    assert results[1].stats["cached_tokens"] < len(histories[1])  # damaged: the checksum fails, rebuilt
    assert "checksum" in caplog.text
    assert results[2].stats["cached_tokens"] == len(histories[2])  # the intact one is still there
    # rebuilt: the next restart finds all three again, and nothing foreign was deleted
    again = PrefixStore(fresh_model(tiny_dirs), memory_bytes=BUDGET, directory=tmp_path)
    view = again.view(None)
    for h in histories:
        assert generate(model, tokenizer, h + [9, 10], max_tokens=1, prompt_cache=view,
                        eos_token_ids=()).stats["cached_tokens"] >= len(h)
    assert (folder / "readme.txt").exists() and (folder / "notes.safetensors").exists()


def test_a_drafted_conversation_resumes_with_its_drafter_state_after_a_restart(tiny_dirs, tmp_path, monkeypatch):
    import mlx.core as mx

    from mlx_dsv4 import load
    from mlx_dsv4.speculative import Drafting

    model, tokenizer = load(tiny_dirs["flash"], mtp=True)
    store = PrefixStore(model, memory_bytes=BUDGET, directory=tmp_path)
    prompt = [0] + words(5, 60)
    first = generate(model, tokenizer, prompt, max_tokens=6, prompt_cache=store.view("k1"), eos_token_ids=(),
                     draft="mtp", num_draft=2)
    history = prompt + first.tokens
    saved = store.match("k1", history + [1])
    assert saved is not None and saved.tokens == history and saved.draft["drafter"] == "mtp"

    def bits(arrays):
        return {name: bytes(memoryview(value.view(mx.uint8))) for name, value in arrays.items()}

    restored = []
    original_load = Drafting.load_drafter_state

    def recording(self, arrays, meta, tokens):
        original_load(self, arrays, meta, tokens)
        restored.append(bits(self.drafter_state()[0]))

    fresh, _ = load(tiny_dirs["flash"], mtp=True)
    restarted = PrefixStore(fresh, memory_bytes=BUDGET, directory=tmp_path)
    follow_up = history + words(6, 12)
    monkeypatch.setattr(Drafting, "load_drafter_state", recording)
    again = generate(fresh, tokenizer, follow_up, max_tokens=8, prompt_cache=restarted.view("k1"),
                     eos_token_ids=(), draft="mtp", num_draft=2)
    assert again.stats["cached_tokens"] == len(history) and restarted.stats()["disk_loads"] == 1
    assert restored == [bits(saved.draft["arrays"])]
    assert again.tokens == generate(model, tokenizer, follow_up, max_tokens=8, eos_token_ids=()).tokens
