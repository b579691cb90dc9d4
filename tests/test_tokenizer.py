import json
import random
import shutil

import pytest

from mlx_dsv4.tokenizer import load_tokenizer, packaged_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


SPECIAL_IDS = {
    "<｜begin▁of▁sentence｜>": 0,
    "<｜end▁of▁sentence｜>": 1,
    "<｜User｜>": 128803,
    "<｜Assistant｜>": 128804,
    "<think>": 128821,
    "</think>": 128822,
    "｜DSML｜": 128825,
    "<｜latest_reminder｜>": 128828,
}


@pytest.mark.parametrize("string, token_id", SPECIAL_IDS.items())
def test_protocol_strings_are_single_ids(tokenizer, string, token_id):
    assert tokenizer.encode(string) == [token_id]
    assert tokenizer.encode("a" + string + "b")[1] == token_id
    assert tokenizer.decode([token_id]) == string


def test_vocabulary_facts(tokenizer):
    assert tokenizer.vocab_size == len(tokenizer) == 129280
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.eos_token_ids == {1}
    assert tokenizer.bos_token == "<｜begin▁of▁sentence｜>"
    # No special tokens are added implicitly.
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi")


def random_unicode(rng, length):
    pools = [
        (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
        (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
        (0xFF00, 0xFFEF), (0x2000, 0x206F),
    ]
    chars = []
    for _ in range(length):
        low, high = rng.choice(pools)
        chars.append(chr(rng.randint(low, high)))
        if rng.random() < 0.15:
            chars.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", "\u200d", "\ufe0f", "\u0301"]))
    return "".join(chars)


SAMPLES = [
    "",
    " ",
    "   leading and trailing   ",
    "\n\n\t\r\n \u3000 \u00a0",
    "def f(x):\n    return {'a': [x, 1e-3]}  # comment\n",
    "if (a<b && c>d) { printf(\"%d\\n\", a); }",
    "SELECT * FROM t WHERE name = 'O''Brien';",
    "👩‍👩‍👧‍👦 🇫🇷 é e\u0301 ñ 中文 日本語 한국어 العربية हिन्दी",
    "<｜User｜>hi<｜Assistant｜></think>ok<｜end▁of▁sentence｜>",
    "\x00\x01\x7f control",
    "0123456789" * 7,
]


def test_round_trip_fixed_samples(tokenizer):
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_random_unicode(tokenizer):
    rng = random.Random(7)
    for _ in range(200):
        text = random_unicode(rng, rng.randint(1, 60))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_streaming_detokenizer_never_splits_a_character(tokenizer):
    rng = random.Random(11)
    texts = SAMPLES + [random_unicode(rng, 80) for _ in range(40)]
    detokenizer = tokenizer.new_detokenizer()
    for text in texts:
        detokenizer.reset()
        segments = []
        for token_id in tokenizer.encode(text):
            detokenizer.add_token(token_id)
            segments.append(detokenizer.last_segment)
        detokenizer.finalize()
        segments.append(detokenizer.last_segment)
        assert "".join(segments) == text == detokenizer.text
        assert all("\ufffd" not in s for s in segments)
        assert all(not (0xD800 <= ord(c) <= 0xDFFF) for s in segments for c in s)


def test_multibyte_character_is_held_until_complete(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # one emoji, several byte tokens
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token_id in ids[:-1]:
        detokenizer.add_token(token_id)
        assert detokenizer.last_segment == ""
    detokenizer.add_token(ids[-1])
    assert detokenizer.last_segment == "😀"
    assert detokenizer.tokens == ids


def test_checkpoint_directory_tokenizer_is_preferred(tmp_path):
    shutil.copy(packaged_tokenizer_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"bos_token": "<｜User｜>", "eos_token": {"content": "<｜Assistant｜>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    custom = load_tokenizer(tmp_path)
    assert (custom.bos_token_id, custom.eos_token_id) == (128803, 128804)


def test_directory_without_tokenizer_falls_back_to_the_package(tmp_path):
    fallback = load_tokenizer(tmp_path)
    assert fallback.bos_token_id == 0
    assert fallback.encode("<think>") == [128821]
