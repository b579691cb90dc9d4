import time

import pytest

from mlx_dsv4.chat import (
    ChatFormatError,
    ContentDelta,
    Done,
    DSMLStreamParser,
    ReasoningDelta,
    ToolCallComplete,
    ToolCallStarted,
    parse_completion,
)

EOS = "<｜end▁of▁sentence｜>"
BLOCK = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="search">\n'
    '<｜DSML｜parameter name="query" string="true">a </ b <x> "c"</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="limit" string="false">5</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>\n'
    "</｜DSML｜tool_calls>"
)

# (thinking_mode, strict, completion)
CORPUS = [
    ("chat", True, "Hello, world." + EOS),
    ("chat", True, "Use <b>bold</b> and a < b, </thin k>, <|not dsml, ｜ pipe, </" + EOS),
    ("chat", True, "Let me look." + BLOCK + EOS),
    ("chat", True, BLOCK),
    ("chat", True, "trailing spaces  \n\n\n" + EOS),
    ("thinking", True, "Reason <think-ish> </ thi\n\n</think>Answer: 42." + EOS),
    ("thinking", True, "Plan: call tools.</think>" + BLOCK + EOS),
    ("thinking", True, "中文推理😀</think>内容😀" + EOS),
    ("chat", False, "Calling" + BLOCK.replace("｜", "|") + EOS),
    ("chat", False, "x" + BLOCK.replace(' string="true"', "").replace('name="now"', "name=now")),
    ("chat", False, "cut" + BLOCK[:-30]),
    ("chat", False, "a</think>b<think>c ｜DSML｜ d<｜DSML｜tool_ca"),
    ("thinking", False, "no close" + BLOCK + EOS + "junk"),
    ("thinking", False, "unterminated reasoning <｜DSML｜"),
]


def call_ids(index):
    return f"call_{index}"


def merged(events):
    """Events with adjacent deltas of the same kind joined."""
    result = []
    for event in events:
        if result and isinstance(event, (ReasoningDelta, ContentDelta)) and type(result[-1]) is type(event):
            result[-1] = type(event)(result[-1].text + event.text)
        else:
            result.append(event)
    return result


def run(thinking_mode, strict, chunks):
    parser = DSMLStreamParser(thinking_mode, strict=strict, call_id_factory=call_ids)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def assert_clean_content(events):
    for event in events:
        if isinstance(event, ContentDelta):
            for forbidden in ("｜DSML｜", "|DSML|", "</think>", "<think>", EOS):
                assert forbidden not in event.text


@pytest.mark.parametrize("thinking_mode, strict, text", CORPUS)
def test_every_split_gives_the_same_events(thinking_mode, strict, text):
    whole = run(thinking_mode, strict, [text])
    expected = merged(whole)
    assert isinstance(expected[-1], Done)
    assert_clean_content(whole)
    for cut in range(len(text) + 1):
        events = run(thinking_mode, strict, [text[:cut], text[cut:]])
        assert merged(events) == expected, cut
        assert_clean_content(events)
    char_by_char = run(thinking_mode, strict, list(text))
    assert merged(char_by_char) == expected
    assert_clean_content(char_by_char)


def test_corpus_events_agree_with_parse_completion():
    for thinking_mode, strict, text in CORPUS:
        events = merged(run(thinking_mode, strict, [text]))
        parsed = parse_completion(text, thinking_mode, strict=strict, call_id_factory=call_ids)
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        calls = [e for e in events if isinstance(e, ToolCallComplete)]
        assert content == parsed["content"]
        assert [c.arguments for c in calls] == [c["function"]["arguments"] for c in parsed["tool_calls"]]
        assert list(events[-1].repairs) == parsed["repairs"]


def test_event_stream_of_a_tool_turn():
    events = merged(run("thinking", True, ["Plan.</think>Let me look.", BLOCK, EOS]))
    assert events == [
        ReasoningDelta("Plan."),
        ContentDelta("Let me look."),
        ToolCallStarted(0, "search"),
        ToolCallStarted(1, "now"),
        ToolCallComplete(0, "search", '{"query": "a </ b <x> \\"c\\"", "limit": 5}', "call_0"),
        ToolCallComplete(1, "now", "{}", "call_1"),
        Done(eos=True, repairs=()),
    ]


def test_calls_complete_only_when_the_block_closes():
    parser = DSMLStreamParser("chat", strict=True, call_id_factory=call_ids)
    cut = BLOCK.index("</｜DSML｜tool_calls>")
    events = parser.feed(BLOCK[:cut])
    assert [type(e) for e in events] == [ToolCallStarted, ToolCallStarted]
    assert [type(e) for e in parser.feed(BLOCK[cut:])] == [ToolCallComplete, ToolCallComplete]


def test_content_is_streamed_before_a_possible_tag_is_decided():
    parser = DSMLStreamParser("chat")
    assert parser.feed("Hello <") == [ContentDelta("Hello")]
    assert parser.feed("b") == [ContentDelta(" <b")]
    assert parser.feed("\n\n<｜DS") == []
    assert parser.feed("ML｜tool_calls>\n") == []


def test_strict_stream_raises_at_the_offending_chunk():
    parser = DSMLStreamParser("chat", strict=True)
    parser.feed("ok ")
    with pytest.raises(ChatFormatError) as caught:
        parser.feed("</think>")
    assert caught.value.offset == 3


def test_feeding_token_ids():
    from mlx_dsv4.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    text = "思考😀</think>Looking it up." + BLOCK + EOS
    ids = tokenizer.encode(text)
    assert 128822 in ids and 128825 in ids and ids[-1] == 1
    parser = DSMLStreamParser("thinking", strict=True, tokenizer=tokenizer, call_id_factory=call_ids)
    events = []
    for token_id in ids:
        events += parser.feed_tokens([token_id])
    events += parser.finish()
    assert merged(events) == merged(run("thinking", True, [text]))


def outcome(thinking_mode, strict, chunks):
    try:
        return merged(run(thinking_mode, strict, chunks))
    except ChatFormatError as err:
        return ("error", err.offset, str(err))


def test_random_documents_split_anywhere_agree():
    import random

    from test_chat_parse import FRAGMENTS, mutations

    rng = random.Random(99)
    bases = [text for _, _, text in CORPUS]
    for _ in range(250):
        text = mutations(rng, rng.choice(bases)) if rng.random() < 0.7 else "".join(
            rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 25))
        )
        thinking_mode = rng.choice(["chat", "thinking"])
        strict = rng.random() < 0.5
        expected = outcome(thinking_mode, strict, [text])
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert outcome(thinking_mode, strict, pieces) == expected, (text, cuts)
        assert outcome(thinking_mode, strict, list(text)) == expected, text


TOOL_BLOCK_OPEN = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="now">\n'


@pytest.mark.parametrize(
    "thinking_mode, head, tail, expected",
    [
        ("chat", "Hello", "x" + EOS, lambda n: [ContentDelta("Hello" + " " * n + "x")]),
        ("thinking", "Hmm", "</think>ok" + EOS, lambda n: [ReasoningDelta("Hmm" + " " * n), ContentDelta("ok")]),
        ("chat", TOOL_BLOCK_OPEN, "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS,
         lambda n: [ToolCallStarted(0, "now"), ToolCallComplete(0, "now", "{}", "call_0")]),
    ],
    ids=["content", "reasoning", "between-tags"],
)
def test_whitespace_fed_one_character_at_a_time_takes_linear_time(thinking_mode, head, tail, expected):
    # Holding 200k characters of whitespace in a string rebuilt per character took 78 s;
    # in linear time it is well under a second here. Stop early rather than wait that out.
    n, budget = 200_000, 8.0
    parser = DSMLStreamParser(thinking_mode, call_id_factory=call_ids)
    events = parser.feed(head)
    start = time.process_time()
    for i in range(n):
        events += parser.feed(" ")
        if i % 1000 == 0:
            assert time.process_time() - start < budget, f"{i} characters took over {budget} s"
    events += parser.feed(tail) + parser.finish()
    assert merged(events)[:-1] == expected(n)


CUT_OFF_CALLS = [
    # an invoke cut off by a new tool_calls block, then a complete call
    "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
    "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_time\">\n"
    '<｜DSML｜parameter name="zone" string="true">CET</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS,
    # an invoke cut off by the next invoke
    "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
    '<｜DSML｜invoke name="get_time">\n'
    '<｜DSML｜parameter name="zone" string="true">CET</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS,
    # an invoke cut off by the end of the block
    "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
    "</｜DSML｜tool_calls>" + EOS,
]


@pytest.mark.parametrize("text", CUT_OFF_CALLS)
def test_a_call_that_did_not_parse_completely_is_never_returned(text):
    events = merged(run("chat", False, [text]))
    calls = [e for e in events if isinstance(e, ToolCallComplete)]
    assert all(c.name != "get_weather" for c in calls), calls
    assert [c.name for c in calls] == (["get_time"] if "get_time" in text else [])
    done = events[-1]
    assert any("get_weather" in r and "discarded" in r for r in done.repairs), done.repairs
    assert [c["function"]["name"] for c in parse_completion(text, "chat", strict=False).get("tool_calls") or []] \
        == [c.name for c in calls]
    with pytest.raises(ChatFormatError):
        parse_completion(text, "chat", strict=True)
