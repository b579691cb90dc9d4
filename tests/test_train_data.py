"""The synthetic task generator: deterministic, V4 chat format, assistant-only targets, held-out split."""

import hashlib
import json
import re

import numpy as np
import pytest

from mlx_dsv4.chat import parse_completion
from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train.data import KINDS, OPS, TaskGenerator, _train_pair
from mlx_dsv4.train.trainer import _Stream, pack


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def digest(tokenizer, seed, split="train", n=24):
    gen = TaskGenerator(tokenizer, seed=seed, split=split, retrieval_tokens=(200, 300))
    h = hashlib.sha256()
    for _ in range(n):
        ex = next(gen)
        h.update(np.array(ex.ids, np.int32).tobytes() + np.array(ex.mask, bool).tobytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tokenizer):
    assert digest(tokenizer, 3) == digest(tokenizer, 3)
    assert digest(tokenizer, 3) != digest(tokenizer, 4)
    assert digest(tokenizer, 3) != digest(tokenizer, 3, split="eval")


def test_every_kind_is_the_tokenised_chat_text_with_assistant_targets(tokenizer):
    gen = TaskGenerator(tokenizer, seed=0, retrieval_tokens=(200, 300))
    for kind in KINDS:
        ex = gen.example(kind)
        assert tokenizer.decode(ex.ids) == ex.text
        assert len(ex.ids) == len(ex.mask) and any(ex.mask) and not ex.mask[0]
        assert ex.ids[-1] == tokenizer.eos_token_id and ex.mask[-1]


def test_tool_example_targets_are_the_call_then_the_answer_from_the_result(tokenizer):
    gen = TaskGenerator(tokenizer, seed=1)
    ex = gen.example("tool")
    m = ex.meta
    targets = tokenizer.decode([t for t, keep in zip(ex.ids, ex.mask) if keep])
    call_text, answer_text, rest = targets.split(tokenizer.eos_token)
    assert rest == ""
    call = parse_completion(call_text + tokenizer.eos_token, "chat")["tool_calls"][0]["function"]
    assert call["name"] == m["call"] and json.loads(call["arguments"]) == m["arguments"]
    assert answer_text == m["answer"]
    assert f"<tool_result>{m['result']}</tool_result>" in ex.text  # between the targets, not one


def test_session_asks_questions_in_turn_each_answered_by_its_own_call(tokenizer):
    gen = TaskGenerator(tokenizer, seed=4, mix={"session": 1.0}, session_tokens=900)
    counts = set()
    for _ in range(12):
        ex = next(gen)
        m = ex.meta
        assert ex.kind == "session" and 2 <= m["rounds"] <= 6 and len(ex.ids) <= 900
        counts.add(m["rounds"])
        targets = tokenizer.decode([t for t, keep in zip(ex.ids, ex.mask) if keep]).split(tokenizer.eos_token)
        assert targets[-1] == "" and len(targets) == 2 * m["rounds"] + 1
        for question, call_text, answer in zip(m["questions"], targets[0::2], targets[1::2]):
            call = parse_completion(call_text + tokenizer.eos_token, "chat")["tool_calls"][0]["function"]
            for value in json.loads(call["arguments"]).values():
                if value != "fahrenheit":
                    assert all(str(part) in question for part in str(value).split(" ") if part not in OPS)
            assert answer in m["answers"]
        assert ex.text.count("## Tools") == 1 and ex.text.count("<tool_result>") == m["rounds"]
    assert len(counts) > 2


def test_eval_split_asks_about_unseen_cities_unless_told_training_ones(tokenizer):
    from mlx_dsv4.train.data import EVAL_CITIES, TRAIN_CITIES

    def questions(**options):
        gen = TaskGenerator(tokenizer, seed=3, split="eval", **options)
        return [ex.meta for ex in (gen.example("tool") for _ in range(40))]

    unseen, seen = questions(), questions(unseen_cities=False)
    cities = [m["arguments"]["city"] for m in unseen if m["call"] == "get_weather"]
    assert len(cities) > 5 and set(cities) - set(TRAIN_CITIES) and set(cities) <= set(EVAL_CITIES + TRAIN_CITIES[:4])
    for a, b in zip(unseen, seen):  # the same draws but the city
        assert a["call"] == b["call"] and a["system"] == b["system"]
        if a["call"] == "get_weather":
            assert b["arguments"]["city"] in TRAIN_CITIES
            assert a["question"].replace(a["arguments"]["city"], b["arguments"]["city"]) == b["question"]
        else:
            assert a == b


def question_patterns(split):
    """Regular expressions of the tool-question templates of ``split``."""
    from mlx_dsv4.train.data import ADD_TEMPLATES, CALC_TEMPLATES, WEATHER_TEMPLATES

    return [re.escape(t).replace(r"\{a\}", "[0-9]+").replace(r"\{b\}", "[0-9]+").replace(r"\{op\}", ".")
            .replace(r"\{word\}", "[a-z ]+").replace(r"\{city\}", "[A-Za-z]+")
            for templates in (ADD_TEMPLATES, CALC_TEMPLATES, WEATHER_TEMPLATES) for t in templates[split]]


def test_composed_questions_vary_the_phrasing_and_never_write_an_evaluation_one(tokenizer):
    from mlx_dsv4.train.data import CLOSERS, OPENERS

    held_out = re.compile("|".join(question_patterns("eval")))
    openers, closers = "|".join(map(re.escape, OPENERS)), "|".join(map(re.escape, CLOSERS))
    templated = re.compile(f"(?:{openers})?(?:{'|'.join(question_patterns('train'))})(?:{closers})?"
                           "(?: Answer in fahrenheit\\.| Use fahrenheit\\.)?")
    assert held_out.search("Sum 417 and 141 for me.") and templated.fullmatch("Hi! Weather in Oslo? Thanks!")
    for share, low, high in ((0.0, 0, 0), (0.5, 0.3, 0.6)):
        gen = TaskGenerator(tokenizer, seed=6, mix={"tool": 1.0}, composed_questions=share)
        other = 0
        for _ in range(300):
            m = next(gen).meta
            assert not held_out.search(m["question"]), m["question"]
            args = m["arguments"]
            for value in ([args["city"]] if "city" in args else [args["a"], args["b"]] if "a" in args
                          else args["expression"].split(" ")[::2]):
                assert str(value) in m["question"]
            other += not templated.fullmatch(m["question"])
        assert low * 300 <= other <= high * 300, (share, other)
    assert TaskGenerator(tokenizer, seed=6, split="eval", composed_questions=0.5).example("tool").meta == \
        TaskGenerator(tokenizer, seed=6, split="eval").example("tool").meta  # evaluation questions stay as they are


def test_filler_leads_open_that_share_of_questions_with_filler_words_only(tokenizer):
    from mlx_dsv4.train.data import FILLER_MARKS, FILLER_WORDS

    plain = [TaskGenerator(tokenizer, seed=8, mix={"tool": 1.0}, composed_questions=0.5) for _ in range(2)]
    filled = TaskGenerator(tokenizer, seed=8, mix={"tool": 1.0}, composed_questions=0.5, filler_leads=0.5)
    assert [next(plain[0]).meta for _ in range(50)] == [next(plain[1]).meta for _ in range(50)]
    held_out = re.compile("|".join(question_patterns("eval")), re.IGNORECASE)
    words = set(FILLER_WORDS)
    opened = 0
    for _ in range(300):
        m = next(filled).meta
        args = m["arguments"]
        for value in ([args["city"]] if "city" in args else [args["a"], args["b"]] if "a" in args
                      else args["expression"].split(" ")[::2]):
            assert str(value) in m["question"]
        assert not held_out.search(m["question"]), m["question"]
        first = m["question"].split(" ")[0].strip(":.,!?").lower()
        if first in words:
            lead = m["question"]
            for mark in FILLER_MARKS[:-1]:
                lead = lead.split(mark)[0]
            opened += set(lead.lower().split(" ")) <= words
    assert 0.4 * 300 <= opened <= 0.65 * 300, opened
    assert TaskGenerator(tokenizer, seed=8, split="eval", filler_leads=1.0).example("tool").meta == \
        TaskGenerator(tokenizer, seed=8, split="eval").example("tool").meta


def test_eval_split_holds_out_operands(tokenizer):
    for split in ("train", "eval"):
        gen = TaskGenerator(tokenizer, seed=0, split=split, mix={"tool": 1.0})
        for _ in range(30):
            args = next(gen).meta["arguments"]
            if "a" in args:
                pair = (args["a"], args["b"])
            elif "expression" in args:
                a, _, b = args["expression"].split(" ")
                pair = (int(a), int(b))
            else:
                continue
            assert _train_pair(*pair) == (split == "train")


def test_retrieval_length_and_answer(tokenizer):
    gen = TaskGenerator(tokenizer, seed=0)
    for n_tokens in (1024, 2048):
        ex = gen.retrieval(n_tokens)
        assert abs(len(ex.ids) - n_tokens) < 0.1 * n_tokens
        assert f"\n{ex.meta['key']}: {ex.meta['answer']}\n" in ex.text
        assert tokenizer.decode([t for t, keep in zip(ex.ids, ex.mask) if keep]) == ex.meta["answer"] + tokenizer.eos_token


def test_packing_keeps_every_example_whole(tokenizer):
    stream = _Stream(TaskGenerator(tokenizer, seed=0, retrieval_tokens=(200, 300)))
    for _ in range(8):
        ids, mask, kinds = pack(stream, 1024)
        assert kinds == ["retrieval"] or "retrieval" not in kinds
        assert len(ids) <= 1024 or len(kinds) == 1
        assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == len(kinds)


def test_copy_targets_are_the_items_of_the_question(tokenizer):
    gen = TaskGenerator(tokenizer, seed=2, mix={"copy": 1.0})
    whats = set()
    for _ in range(40):
        ex = next(gen)
        assert ex.kind == "copy"
        items = ex.meta["answer"]
        targets = tokenizer.decode([t for t, keep in zip(ex.ids, ex.mask) if keep])
        assert targets == items + tokenizer.eos_token
        question = ex.text.split("<｜User｜>")[1].split("<｜Assistant｜>")[0]
        assert question.endswith(items)
        whats.add(question.split(":")[0].split()[-1])
    assert {"numbers", "names", "expression"} <= whats


def test_default_mix_draws_no_copy_examples(tokenizer):
    gen = TaskGenerator(tokenizer, seed=0, retrieval_tokens=(200, 300))
    assert "copy" not in {next(gen).kind for _ in range(60)}


@pytest.mark.parametrize("text, message", [
    ("tool=1,foo=2", "'foo=2' is not KIND=WEIGHT"),
    ("tool", "'tool' is not KIND=WEIGHT"),
    ("tool=x", "weight of 'tool' is not a number: 'x'"),
    ("tool=-1,copy=1", "weight of 'tool' is negative"),
    ("tool=0", "every weight is zero"),
])
def test_bad_mix_is_named(text, message):
    from argparse import ArgumentTypeError

    from mlx_dsv4.cli.train_tiny import parse_mix

    with pytest.raises(ArgumentTypeError, match=message):
        parse_mix(text)
    assert parse_mix("tool=0.5,copy=0.25") == {"tool": 0.5, "copy": 0.25}


@pytest.mark.parametrize("text, message", [
    ("o_lora_rank", "'o_lora_rank' is not KEY=INTEGER"),
    ("no_such_key=3", "'no_such_key=3' is not KEY=INTEGER"),
    ("rope_scaling=3", "'rope_scaling=3' is not KEY=INTEGER"),  # not an integer value of the config
    ("o_lora_rank=big", "value of 'o_lora_rank' is not an integer: 'big'"),
])
def test_bad_model_config_is_named(text, message):
    from argparse import ArgumentTypeError

    from mlx_dsv4.cli.train_tiny import parse_config
    from mlx_dsv4.train.trainer import trained_config

    with pytest.raises(ArgumentTypeError, match=message):
        parse_config(text)
    overrides = parse_config("o_lora_rank=64,moe_intermediate_size=48")
    cfg = trained_config(**overrides)
    assert (cfg["o_lora_rank"], cfg["moe_intermediate_size"], cfg["hidden_size"]) == (64, 48, 64)


def test_argument_positions_are_the_call_arguments_and_their_ends(tokenizer):
    from mlx_dsv4.chat.wiretext import to_json
    from mlx_dsv4.train.trainer import argument_positions

    gen = TaskGenerator(tokenizer, seed=2, mix={"tool": 1.0})
    toolsets = set()
    for _ in range(12):
        ex = gen.example("tool")
        toolsets.add(ex.meta["toolset"])
        pieces = [tokenizer.decode([t]) for t in ex.ids]
        picked = argument_positions(ex.ids, tokenizer)
        values = [v if isinstance(v, str) else to_json(v) for v in ex.meta["arguments"].values()]
        assert "".join(pieces[p] for p in picked) == "".join(value + "</" for value in values)  # and the close
        assert all(ex.mask[p] for p in picked)  # the system prompt's format description holds none
    assert toolsets == {"weather", "add"}
    assert len(argument_positions(gen.example("chat").ids, tokenizer)) == 0


def test_argument_weight_repeats_the_argument_targets(tokenizer):
    from mlx_dsv4.train.trainer import Trainer, TrainOptions, argument_positions

    options = dict(mix={"tool": 1.0}, max_tokens=1500, guide_weight=1.0)
    plain, weighted = (Trainer(tokenizer, TrainOptions(argument_weight=w, **options)) for w in (1, 3))
    (a, kinds), (b, _) = plain.batch(), weighted.batch()
    assert set(kinds) == {"tool"} and len(kinds) > 1
    ids = np.array(a["tokens"][0])
    np.testing.assert_array_equal(ids, np.array(b["tokens"][0]))
    targets = set(argument_positions(ids, tokenizer) - 1)
    positions, counts = np.unique(np.array(b["main_pos"]), return_counts=True)
    np.testing.assert_array_equal(positions, np.array(a["main_pos"]))
    assert {int(p) for p, c in zip(positions, counts) if c == 3} == targets and set(counts) == {1, 3}
    np.testing.assert_array_equal(np.array(b["main_targets"]), ids[np.array(b["main_pos"]) + 1])
    # Only the next-token loss counts them again: the copy guidance and the indexer's queries do not.
    for key in ("copy_queries", "index_pos"):
        np.testing.assert_array_equal(np.array(b[key]), np.array(a[key]))
    assert len(np.unique(np.array(b["copy_queries"]))) == len(b["copy_queries"]) > 0


def test_name_examples_spell_every_city_as_a_call_argument_starts_it(tokenizer):
    from mlx_dsv4.train.data import EVAL_CITIES, TRAIN_CITIES, WEATHER_TEMPLATES

    gen = TaskGenerator(tokenizer, seed=0, mix={"name": 1.0})
    seen = set()
    for _ in range(200):
        ex = next(gen)
        city = ex.meta["answer"]
        seen.add(city)
        answer = [t for t, keep in zip(ex.ids, ex.mask) if keep]
        argument = tokenizer.encode(f'string="true">{city}</')
        assert answer[:-1] == [t for t in argument if tokenizer.decode([t]) not in ('string', '="', 'true', '">',
                                                                                   '</')]
        asked = ex.text.split("Which city does this ask about? ")[1].split("<｜Assistant｜>")[0]
        assert any(asked == t.format(city=city) for t in WEATHER_TEMPLATES["train"])
    assert seen & set(EVAL_CITIES) and seen & set(TRAIN_CITIES)


def _tokens_over(ex, tokenizer, start: int, end: int) -> list:
    """The ids of `ex` whose text overlaps characters [start, end) of `ex.text`."""
    out, at = [], 0
    for t in ex.ids:
        size = len(tokenizer.decode([t]))
        if at < end and at + size > start:
            out.append(t)
        at += size
    return out


def test_final_answers_write_the_result_values_with_the_results_tokens(tokenizer):
    # a copied value has to be the same tokens in the answer as in the tool result: " snow" in a
    # sentence is one token, "snow" in the result's JSON two, " Krakow" two others than "Krakow",
    # and " -" in "= -5" is not the result's "-"
    seen = set()
    for split in ("train", "eval"):
        gen = TaskGenerator(tokenizer, seed=5, split=split, mix={"tool": 1.0})
        for _ in range(60):
            ex = next(gen)
            m = ex.meta
            if m["call"] == "get_weather":
                data = json.loads(m["result"])
                values = [data["city"], json.dumps(data["temperature"]), data["conditions"]]
            else:
                values = [m["result"]]
                assert not m["result"].startswith("-")  # differences keep the larger operand first
            result_at = ex.text.index(f"<tool_result>{m['result']}</tool_result>") + len("<tool_result>")
            answer_at = ex.text.rindex(m["answer"])
            for value in values:
                in_result = result_at + m["result"].index(value)
                in_answer = answer_at + m["answer"].rindex(value)
                assert _tokens_over(ex, tokenizer, in_answer, in_answer + len(value)) == \
                    _tokens_over(ex, tokenizer, in_result, in_result + len(value)), (value, m["answer"])
            seen.add((m["call"], m["arguments"].get("expression", " ? ").split(" ")[1]))
    assert {("get_weather", "?"), ("calculate", "-"), ("add", "?")} <= seen


def test_training_phrasings_vary_and_never_are_an_evaluation_phrasing(tokenizer):
    import re

    from mlx_dsv4.train.data import ADD_TEMPLATES, CALC_TEMPLATES, CLOSERS, OPENERS, WEATHER_TEMPLATES

    def pattern(template):  # a template as a regex over questions: each field one token-free run
        return re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(
            a=r"\d+", b=r"\d+", op=r"\S", word=r"[a-z ]+", city=r"[A-Za-z]+")

    evaluation = [pattern(t) for t in ADD_TEMPLATES["eval"] + CALC_TEMPLATES["eval"] + WEATHER_TEMPLATES["eval"]]
    asked = {split: [] for split in ("train", "eval")}
    for split in asked:
        gen = TaskGenerator(tokenizer, seed=4, split=split, mix={"tool": 1.0})
        for _ in range(150):
            asked[split].append(next(gen).meta["question"].split(" In fahrenheit")[0])
    for question in asked["train"]:
        assert not any(re.fullmatch(p, question) for p in evaluation), question
    for question in asked["eval"]:
        assert any(re.fullmatch(p, question) for p in evaluation), question
    assert any(q.startswith(OPENERS) for q in asked["train"]) and any(q.endswith(CLOSERS) for q in asked["train"])
    assert not any(q.startswith(OPENERS) or q.endswith(CLOSERS) for q in asked["eval"])


def test_argument_sources_find_each_argument_where_the_question_holds_it(tokenizer):
    from mlx_dsv4.chat.special import TOKEN_IDS, USER
    from mlx_dsv4.train.trainer import argument_guidance, argument_positions, argument_sources

    gen = TaskGenerator(tokenizer, seed=5, mix={"tool": 1.0})
    cases = set()
    for _ in range(40):
        ex = gen.example("tool")
        ids, m = np.array(ex.ids), ex.meta
        pieces = [tokenizer.decode([t]) for t in ids]
        sources = argument_sources(ids, tokenizer, 128)
        call = ex.mask.index(True)
        user = int(np.nonzero(ids[:call] == TOKEN_IDS[USER])[0][-1])
        assert all(user < s < call for found, _ in sources.values() for s in found)  # the question's tokens
        # each value's tokens, up to the token that closes it
        values, current = [], []
        for k in argument_positions(ids, tokenizer):
            if pieces[k].startswith("</"):
                values.append(current)
                current = []
            else:
                current.append(int(k))
        assert len(values) == len(m["arguments"])
        # only a space between an operator word and a number may be found nowhere
        assert all(k - 1 in sources or pieces[k] == " " for value in values for k in value)
        text = {k: "".join(pieces[s] for s in sources[k - 1][0]) for value in values for k in value if k - 1 in sources}
        if m["call"] == "get_weather":
            city = values[0]
            held = sorted({int(s) for k in city for s in sources[k - 1][0]})
            assert "".join(pieces[s] for s in held).strip() == m["arguments"]["city"]
            # " Krakow" in a question is no "K": spelled; "Delhi weather?" starts with the call's "Del"
            assert sources[city[0] - 1][1] == (" " + m["arguments"]["city"] in m["question"])
            expected = [city[0] - 1] if sources[city[0] - 1][1] else []
            if "units" in m["arguments"]:
                held = sorted({int(s) for k in values[1] for s in sources[k - 1][0]})
                assert "".join(pieces[s] for s in held) == " fahrenheit"
                expected += [values[1][0] - 1] if sources[values[1][0] - 1][1] else []
            spelled = argument_guidance(ids, tokenizer, 128, 128)["spelled"]
            assert spelled.tolist() == expected  # the first token each source spells, once
            cases.add("weather")
            continue
        numbers = [k for value in values for k in value if pieces[k].isdigit()]
        assert all(text[k] == pieces[k] and not sources[k - 1][1] for k in numbers)
        operands = ([str(m["arguments"][key]) for key in ("a", "b")] if m["call"] == "add"
                    else m["arguments"]["expression"].split()[::2])
        assert [pieces[k] for k in numbers] == operands
        if m["call"] == "calculate":
            op = next(k for k in values[0] if pieces[k].strip() in "+-*/" and pieces[k].strip())
            word = text[op].strip()
            assert (word == pieces[op].strip()) == (not sources[op - 1][1])
            assert word in set(OPS) | {w for words in OPS.values() for w in words}
            if sources[op - 1][1]:
                assert pieces[op].strip() == next(symbol for symbol, words in OPS.items() if word in words)
                cases.add("operator word")
            else:
                cases.add("operator symbol")
        cases.add(m["call"])
        spelled = argument_guidance(ids, tokenizer, 128, 128)["spelled"]
        assert spelled.tolist() == ([op - 1] if m["call"] == "calculate" and sources[op - 1][1] else [])
    assert cases == {"weather", "add", "calculate", "operator word", "operator symbol"}


def test_replies_that_repeat_the_question_are_found_there_and_others_are_not(tokenizer):
    from mlx_dsv4.train.trainer import argument_guidance, argument_sources

    gen = TaskGenerator(tokenizer, seed=6)
    for _ in range(12):
        ex = gen.example("name")
        ids, city = np.array(ex.ids), ex.meta["answer"]
        pieces = [tokenizer.decode([t]) for t in ids]
        sources = argument_sources(ids, tokenizer, 128)
        reply = [k for k in np.nonzero(ex.mask)[0] if pieces[k] != "<｜end▁of▁sentence｜>"]
        assert sorted(j + 1 for j in sources) == reply
        held = sorted({int(s) for k in reply for s in sources[k - 1][0]})
        assert "".join(pieces[s] for s in held) == " " + city and held[0] < reply[0]
        assert argument_guidance(ids, tokenizer, 128, 128)["spelled"].tolist() == [reply[0] - 1]  # " Krakow" spells "K"
    # a reply the question does not hold whole (an answer from a list, a count) has no sources
    for ex in (gen.retrieval(600), gen.example("pattern")):
        assert argument_sources(np.array(ex.ids), tokenizer, 128) == {}


def test_chat_turns_of_each_kind_and_an_unknown_kind_named(tokenizer):
    from mlx_dsv4.train.data import COUNTRIES, GREETINGS

    gen = TaskGenerator(tokenizer, seed=2)
    question, reply, reasoning = gen.chat_turn("capital")
    country = question.removeprefix("What is the capital of ").removesuffix("?")
    assert reply == f"The capital of {country} is {COUNTRIES[country]}." and reply in reasoning
    question, reply, _ = gen.chat_turn("repeat")
    assert question == f"Repeat after me: {reply}" and 2 <= len(reply.split()) <= 5
    question, reply, _ = gen.chat_turn("greeting")
    assert (question, reply) in GREETINGS
    with pytest.raises(ValueError, match="'poem'.*capital"):
        gen.chat_turn("poem")
