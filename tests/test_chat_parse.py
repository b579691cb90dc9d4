import json
import random
import time

import pytest

from mlx_dsv4.chat import (
    ChatFormatError,
    dsml_to_tool_calls,
    encode_messages,
    parse_completion,
    tool_calls_to_dsml,
)
from strict_json import strict_json

EOS = "<｜end▁of▁sentence｜>"


def sequential_ids(index):
    return f"call_{index}"


def rendered_completion(assistant, thinking_mode):
    prompt = encode_messages([{"role": "user", "content": "q"}, assistant], thinking_mode=thinking_mode)
    opener = "<｜Assistant｜><think>" if thinking_mode == "thinking" else "<｜Assistant｜></think>"
    return prompt.split(opener, 1)[1]


ARGUMENT_CASES = [
    {"s": 'say "hi"'},
    {"path": "C:\\dir\\file.txt", "regex": "\\d+\\s*"},
    {"text": "line 1\nline 2\n\n  indented\n"},
    {"html": "</div><p class=\"x\">a < b && c > d</p></"},
    {"xml": "<parameter name=\"x\">not a tag</parameter><invoke>"},
    {"emoji": "👩‍💻 naïve 中文 ｜ pipes | too"},
    {"nested": {"a": [1, {"b": None}], "c": "d"}, "list": [[], {}]},
    {"empty": "", "space": " "},
    {"int": 42, "neg": -7, "float": 3.25, "big": 12345678901234567890, "exp": 1e-09},
    {"null": None, "t": True, "f": False},
    {"number_like": "42", "json_like": "{\"a\": 1}", "null_like": "null"},
    {},
]


@pytest.mark.parametrize("thinking_mode", ["chat", "thinking"])
@pytest.mark.parametrize("arguments", ARGUMENT_CASES)
def test_round_trip_of_a_rendered_turn(arguments, thinking_mode):
    assistant = {
        "role": "assistant",
        "reasoning_content": "Let me think.\nOK." if thinking_mode == "thinking" else None,
        "content": "Calling.",
        "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "tool_a", "arguments": json.dumps(arguments)}},
            {"id": "y", "type": "function", "function": {"name": "tool_b", "arguments": '{"k": 1}'}},
        ],
    }
    parsed = parse_completion(rendered_completion(assistant, thinking_mode), thinking_mode, call_id_factory=sequential_ids)
    assert parsed["reasoning_content"] == assistant["reasoning_content"]
    assert parsed["content"] == "Calling."
    assert parsed["repairs"] == []
    assert parsed["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": {"name": "tool_a", "arguments": json.dumps(arguments, ensure_ascii=False)}},
        {"id": "call_1", "type": "function", "function": {"name": "tool_b", "arguments": '{"k": 1}'}},
    ]
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == arguments


def test_plain_answers():
    assert parse_completion("Hello." + EOS, "chat") == {
        "reasoning_content": None, "content": "Hello.", "tool_calls": [], "repairs": []
    }
    assert parse_completion("hmm</think>\n\nAnswer\n" + EOS, "thinking") == {
        "reasoning_content": "hmm", "content": "\n\nAnswer\n", "tool_calls": [], "repairs": []
    }
    # The stop token is usually stripped by the generator.
    assert parse_completion("hmm</think>Answer", "thinking")["content"] == "Answer"


def test_content_keeps_newlines_beyond_the_blank_line_before_the_block():
    text = 'a\n\n\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    parsed = parse_completion(text, "chat", call_id_factory=sequential_ids)
    assert parsed["content"] == "a\n\n"
    assert parsed["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


BLOCK = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)


@pytest.mark.parametrize(
    "text, offset, words",
    [
        # "é" is two bytes, so the tag after "é\n\n" starts at byte 4.
        ("é\n\n<|DSML|tool_calls>\n</｜DSML｜tool_calls>", 4, "ASCII '|'"),
        ("abc<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>", 3, "blank line"),
        # BLOCK byte layout: tool_calls tag at 2, invoke tag at 25, "city" parameter tag
        # at 63, "days" parameter tag at 138, </invoke> at 210, block end at 253.
        (BLOCK.replace(' string="false"', ""), 138, "malformed attributes"),
        (BLOCK.replace('name="city"', "name=city"), 63, "malformed attributes"),
        (BLOCK.replace(">3<", ">[3<"), 138, "not valid JSON"),
        (BLOCK.replace('name="days"', 'name="city"'), 138, "duplicate parameter"),
        (BLOCK[:-24], 210, "truncated"),
        (BLOCK[:-5], 230, "truncated"),
        (BLOCK + "more", 253, "after the tool_calls block"),
        ("x" + EOS + "y", 28, "after the end"),
        ("a</think>b", 1, "protocol marker in the content"),
        ("a ｜DSML｜ b", 2, "protocol marker in the content"),
        (BLOCK.replace(">\n<｜DSML｜parameter", "> <｜DSML｜parameter", 1), 62, "between DSML tags"),
    ],
)
def test_strict_errors_name_the_byte_offset(text, offset, words):
    with pytest.raises(ChatFormatError) as caught:
        parse_completion(text, "chat")
    assert caught.value.offset == offset
    assert f"byte offset {offset}" in str(caught.value)
    assert words in str(caught.value)


def test_strict_thinking_needs_the_closing_think_tag():
    for text in ("only reasoning", "reasoning" + EOS, "reasoning" + BLOCK):
        with pytest.raises(ChatFormatError):
            parse_completion(text, "thinking")


def lenient(text, thinking_mode="chat"):
    return parse_completion(text, thinking_mode, strict=False, call_id_factory=sequential_ids)


WEATHER_CALL = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}


def test_lenient_repairs_ascii_pipes():
    parsed = lenient(BLOCK.replace("｜", "|") + EOS)
    assert parsed["tool_calls"] == [WEATHER_CALL]
    assert len(parsed["repairs"]) == 8 and all("ASCII '|'" in r for r in parsed["repairs"])


def test_lenient_repairs_missing_string_attribute():
    parsed = lenient(BLOCK.replace(' string="false"', "").replace(' string="true"', ""))
    assert parsed["tool_calls"] == [WEATHER_CALL]
    assert len(parsed["repairs"]) == 2
    assert "parameter 'city' has no string attribute" in parsed["repairs"][0]


def test_lenient_repairs_unquoted_attribute_values():
    text = BLOCK.replace('name="get_weather"', "name=get_weather").replace('string="false"', "string=false")
    parsed = lenient(text)
    assert parsed["tool_calls"] == [WEATHER_CALL]
    assert [r.split(": ", 1)[1][:19] for r in parsed["repairs"]] == ["irregular attribute"] * 2


def test_lenient_never_returns_calls_of_a_truncated_block():
    complete_call_then_cut = BLOCK[: BLOCK.index("</｜DSML｜tool_calls>")]
    for text in (complete_call_then_cut, BLOCK[:60], complete_call_then_cut + EOS):
        parsed = lenient("Sure." + text)
        assert parsed["tool_calls"] == []
        assert parsed["content"] == "Sure."
        assert any("truncated" in r and "discarded" in r for r in parsed["repairs"])


@pytest.mark.parametrize("old, new", [('invoke name="get_weather"', 'invoke name="get｜DSML｜weather"'),
                                      ('parameter name="city"', 'parameter name="ci｜DSML｜ty"')])
def test_names_no_prompt_can_hold_discard_the_call(old, new):
    """A call named with a protocol string could not be sent back in the conversation (the encoder
    refuses it), so the parser does not return it: lenient mode discards it, strict mode raises."""
    text = "Sure." + BLOCK.replace(old, new)
    parsed = lenient(text)
    assert parsed["tool_calls"] == [] and parsed["content"] == "Sure."
    assert any("a prompt cannot hold in a name; call discarded" in r for r in parsed["repairs"])
    with pytest.raises(ChatFormatError, match="cannot hold in a name") as err:
        parse_completion(text, "chat", strict=True)
    assert err.value.offset == len(text[: text.index(new) - len("<｜DSML｜")].encode())  # the tag's first byte
    two = BLOCK.replace("</｜DSML｜invoke>\n</｜DSML｜tool_calls>", "</｜DSML｜invoke>\n"
                        + BLOCK.split("\n", 3)[3].replace(old, new))
    assert [c["function"]["name"] for c in lenient(two)["tool_calls"]] == ["get_weather"]  # the good call stays
    encode_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                         "tool_calls": lenient(two)["tool_calls"]}])


def test_lenient_missing_think_close_and_stray_markers():
    parsed = lenient("thinking" + BLOCK, "thinking")
    assert parsed["reasoning_content"] == "thinking"
    assert parsed["tool_calls"] == [WEATHER_CALL]
    assert "no </think>" in parsed["repairs"][0]
    parsed = lenient("r</think>a</think>b<think>c", "thinking")
    assert (parsed["reasoning_content"], parsed["content"]) == ("r", "abc")
    assert len(parsed["repairs"]) == 2


def test_lenient_invalid_json_is_kept_as_text():
    parsed = lenient(BLOCK.replace(">3<", ">[3<"))
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "days": "[3"}
    assert "not valid JSON" in parsed["repairs"][0]


def test_adapters_round_trip():
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"q": "x\\ny", "n": 2}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    block = tool_calls_to_dsml(calls)
    assert block == (
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="q" string="true">x\ny</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">2</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls>"
    )
    back = dsml_to_tool_calls(block, call_id_factory=lambda i: "ab"[i])
    assert back == calls
    with pytest.raises(ChatFormatError):
        dsml_to_tool_calls("text " + block)
    with pytest.raises(ChatFormatError) as caught:
        dsml_to_tool_calls(" " + block.replace('name="f"', "name=f"))
    assert caught.value.offset == 24  # the space, then the 22-byte <｜DSML｜tool_calls> and "\n"
    with pytest.raises(ChatFormatError):
        dsml_to_tool_calls(block[:-10], strict=False)


# -- fuzzing -----------------------------------------------------------------

FRAGMENTS = [
    "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", '<｜DSML｜invoke name="f">', "</｜DSML｜invoke>",
    '<｜DSML｜parameter name="a" string="true">', '<｜DSML｜parameter name="b" string="false">',
    "</｜DSML｜parameter>", "<|DSML|invoke name=g>", "<|DSML|parameter name=c>", "</|DSML|parameter>",
    "<think>", "</think>", EOS, "<｜begin▁of▁sentence｜>", "｜DSML｜", "\n", "\n\n", " ", "{", "}", "[1,", "\"",
    "<", ">", "</", "｜", "|", "=", "text", "é", "😀", "null", "<｜DSML｜", "</｜DSML｜",
]


def mutations(rng, base):
    text = list(base)
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        position = rng.randint(0, len(text))
        if choice < 0.4 and text:
            del text[min(position, len(text) - 1) : position + rng.randint(1, 8)]
        elif choice < 0.8:
            text.insert(position, rng.choice(FRAGMENTS))
        else:
            text[position:position] = list(rng.choice(FRAGMENTS))
    return "".join(text)


def test_fuzz_parser_returns_or_raises_chat_format_error():
    rng = random.Random(1234)
    base_documents = [
        BLOCK + EOS,
        "reasoning</think>content" + BLOCK + EOS,
        "plain answer" + EOS,
        BLOCK.replace("｜", "|"),
    ]
    for round_ in range(600):
        if round_ % 3 == 0:
            text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 30)))
        else:
            text = mutations(rng, rng.choice(base_documents))
        for thinking_mode in ("chat", "thinking"):
            try:
                parse_completion(text, thinking_mode, strict=True)
            except ChatFormatError:
                pass
            result = parse_completion(text, thinking_mode, strict=False)  # lenient never raises
            for call in result["tool_calls"]:
                assert isinstance(json.loads(call["function"]["arguments"]), dict)


def _seconds_to_parse(text):
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        parse_completion(text, "thinking", strict=False)
        best = min(best, time.perf_counter() - start)
    return best


def test_parsing_time_is_linear():
    unit = (
        "Some reasoning with <angle> brackets, ｜ pipes and </thin almost-tags.\n"
        + "</think>"
    )
    body = 'x < y and "quotes" \\ backslashes 中文 😀\n'
    call = (
        '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="v" string="true">{value}</｜DSML｜parameter>\n</｜DSML｜invoke>'
    )

    def document(size):
        value = body * (size // (2 * len(body)))
        content = "<" * (size // 2)
        return unit + content + "\n\n<｜DSML｜tool_calls>\n" + call.format(value=value) + "\n</｜DSML｜tool_calls>" + EOS

    small, large = document(1 << 17), document(1 << 20)
    small_time, large_time = _seconds_to_parse(small), _seconds_to_parse(large)
    megabytes = len(large.encode()) / 1e6
    print(f"\nparse_completion: {megabytes / large_time:.1f} MB/s on {megabytes:.2f} MB")
    per_char_ratio = (large_time / len(large)) / (small_time / len(small))
    assert per_char_ratio < 4
    assert large_time < 20


# -- strict JSON in tool-call arguments ------------------------------------------------

NON_FINITE_VALUES = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "[1, 2e400]", '{"a": NaN}']


@pytest.mark.parametrize("value", NON_FINITE_VALUES)
def test_strict_parsing_refuses_non_finite_arguments_naming_the_parameter(value):
    with pytest.raises(ChatFormatError, match="parameter 'days' is not valid JSON") as caught:
        parse_completion(BLOCK.replace(">3<", f">{value}<") + EOS, "chat", strict=True)
    assert caught.value.offset == BLOCK.encode().index(b'<\xef\xbd\x9cDSML\xef\xbd\x9cparameter name="days"')


@pytest.mark.parametrize("value", NON_FINITE_VALUES)
@pytest.mark.parametrize("typed", [True, False])
def test_lenient_parsing_keeps_non_finite_arguments_as_text(value, typed):
    block = BLOCK.replace(">3<", f">{value}<")
    if not typed:
        block = block.replace('name="days" string="false"', 'name="days"')
    parsed = lenient(block + EOS)
    arguments = parsed["tool_calls"][0]["function"]["arguments"]
    assert strict_json(arguments) == {"city": "Paris", "days": value}
    assert any("'days'" in repair for repair in parsed["repairs"])


def test_large_finite_numbers_stay_numbers():
    numbers = "[1e308, -2.5e-300, 123456789012345678901234567890]"
    parsed = parse_completion(BLOCK.replace(">3<", f">{numbers}<") + EOS, "chat")
    assert strict_json(parsed["tool_calls"][0]["function"]["arguments"])["days"] == json.loads(numbers)


@pytest.mark.parametrize("arguments", ['{"days": NaN}', '{"days": 1e999}', '{"days": -Infinity}',
                                       {"days": float("nan")}, {"days": float("inf")}])
def test_tool_call_arguments_in_messages_must_be_strict_json(arguments):
    call = {"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    with pytest.raises(ChatFormatError, match="JSON") as caught:
        encode_messages(messages, thinking_mode="chat")
    assert caught.value.index == 1 and caught.value.field.startswith("tool_calls[0].function.arguments")
    with pytest.raises(ChatFormatError, match="JSON"):
        tool_calls_to_dsml([call])
