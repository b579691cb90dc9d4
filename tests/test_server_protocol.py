"""Request translation and SSE assembly, without a model: chunking, thinking flags, error shapes."""

import json
import random
from types import SimpleNamespace

import pytest

from mlx_dsv4.sampling import SamplingParams
from mlx_dsv4.server import anthropic_api, openai_api
from mlx_dsv4.server.common import Assembler, forced_tool_prefix
from mlx_dsv4.server.engine import StepLog
from mlx_dsv4.server.errors import APIError, anthropic_body, openai_body

COMPLETION = (
    "I should look.</think>Let me check.\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Zürich</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">[1, 2]</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)


class Ctx:
    defaults = SamplingParams(max_tokens=64)
    vocab_size = 129280

    def check_prompt_chars(self, chars, param):
        pass

    def check_model(self, name):
        if name != "m":
            raise APIError(404, "no such model", param="model")


def random_pieces(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(30, len(text) - 1))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def log_for(finish, tokens=5):
    log = StepLog()
    log.add(SimpleNamespace(token=1, prompt_tokens=10, cached_tokens=4, generation_tokens=tokens,
                            finish_reason=finish))
    return log


def openai_stream(pieces, plan):
    assembler = Assembler("thinking")
    fmt = openai_api.ChatChunks(plan, "id", 0)
    lines = fmt.start()
    for piece in pieces:
        lines += fmt.events(assembler.feed(piece), assembler)
    lines += fmt.events(assembler.finish(), assembler)
    lines += fmt.end(assembler, log_for("stop"))
    assert lines[-1] == "data: [DONE]\n\n"
    reasoning, content, calls, finish = "", "", {}, None
    for line in lines[:-1]:
        chunk = json.loads(line[len("data: "):])
        if not chunk["choices"]:
            continue
        delta = chunk["choices"][0]["delta"]
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            entry["name"] += call.get("function", {}).get("name", "")
            entry["arguments"] += call.get("function", {}).get("arguments", "")
        finish = chunk["choices"][0]["finish_reason"] or finish
    return reasoning, content, calls, finish


def test_openai_chunks_do_not_depend_on_how_the_text_is_split():
    plan = openai_api.parse_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "high",
         "stream": True, "stream_options": {"include_usage": True}}, Ctx())
    expected = ("I should look.", "Let me check.",
                {0: {"name": "get_weather", "arguments": json.dumps({"city": "Zürich", "days": [1, 2]},
                                                                     ensure_ascii=False)}}, "tool_calls")
    rng = random.Random(3)
    assert openai_stream([COMPLETION], plan) == expected
    for _ in range(40):
        assert openai_stream(random_pieces(COMPLETION, rng), plan) == expected


def test_anthropic_events_do_not_depend_on_how_the_text_is_split():
    plan = anthropic_api.parse_messages_request(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
         "thinking": {"type": "enabled", "budget_tokens": 2000}}, Ctx())
    rng = random.Random(5)
    for trial in range(30):
        pieces = [COMPLETION] if trial == 0 else random_pieces(COMPLETION, rng)
        assembler = Assembler("thinking", id_prefix="toolu_")
        fmt = anthropic_api.MessageEvents(plan, "msg")
        lines = fmt.start(10)
        for piece in pieces:
            lines += fmt.events(assembler.feed(piece), assembler)
        lines += fmt.events(assembler.finish(), assembler)
        lines += fmt.end(assembler, log_for("stop"))
        events = [json.loads(line.split("data: ", 1)[1]) for line in lines]
        blocks, open_index = {}, None
        for e in events:
            if e["type"] == "content_block_start":
                assert open_index is None, "blocks overlap"
                open_index = e["index"]
                blocks[e["index"]] = dict(e["content_block"], text=e["content_block"].get("text", ""), json="")
            elif e["type"] == "content_block_delta":
                assert e["index"] == open_index
                d = e["delta"]
                block = blocks[open_index]
                if d["type"] == "thinking_delta":
                    block["thinking"] += d["thinking"]
                elif d["type"] == "text_delta":
                    block["text"] += d["text"]
                elif d["type"] == "input_json_delta":
                    block["json"] += d["partial_json"]
            elif e["type"] == "content_block_stop":
                assert e["index"] == open_index
                open_index = None
        assert [b["type"] for b in blocks.values()] == ["thinking", "text", "tool_use"]
        assert blocks[0]["thinking"] == "I should look." and blocks[1]["text"] == "Let me check."
        assert json.loads(blocks[2]["json"]) == {"city": "Zürich", "days": [1, 2]}
        assert blocks[2]["id"].startswith("toolu_")
        assert events[-2]["delta"]["stop_reason"] == "tool_use"
        assert events[-2]["usage"] == {"input_tokens": 6, "cache_creation_input_tokens": 0,
                                       "cache_read_input_tokens": 4, "output_tokens": 5}


@pytest.mark.parametrize("body, mode", [
    ({}, ("chat", None)),
    ({"reasoning_effort": "low"}, ("thinking", "low")),
    ({"reasoning_effort": "medium"}, ("thinking", "high")),
    ({"reasoning_effort": "max"}, ("thinking", "max")),
    ({"reasoning_effort": "none"}, ("chat", None)),
    ({"thinking": {"type": "enabled"}}, ("thinking", None)),
    ({"thinking": True, "reasoning_effort": "high"}, ("thinking", "high")),
    ({"thinking": {"type": "disabled"}, "reasoning_effort": "high"}, ("chat", None)),
    ({"chat_template_kwargs": {"thinking": True}}, ("thinking", None)),
])
def test_thinking_switches(body, mode):
    assert openai_api._thinking(body) == mode


def test_prompt_rendering_of_modes_and_forced_tools():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert openai_api.parse_chat_request(base, Ctx()).prompt.endswith("<｜Assistant｜></think>")
    assert openai_api.parse_chat_request({**base, "reasoning_effort": "high"}, Ctx()).prompt.endswith("<think>")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    plan = openai_api.parse_chat_request({**base, "tools": [tool], "tool_choice": "required"}, Ctx())
    assert plan.prompt.endswith("</think>" + forced_tool_prefix()) and plan.prefix == forced_tool_prefix()
    plan = openai_api.parse_chat_request({**base, "response_format": {"type": "json_object"}}, Ctx())
    assert '## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{"type": "json_object"}' \
        in plan.prompt


def test_anthropic_conversation_translation():
    body = {"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "Sys."}], "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "9 C"},
                                     {"type": "text", "text": "and?"}]},
    ], "tools": [{"name": "w", "input_schema": {"type": "object"}}]}
    prompt = anthropic_api.parse_messages_request(body, Ctx()).prompt
    assert prompt.startswith("<｜begin▁of▁sentence｜>Sys.\n\n## Tools")
    assert ('Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="w">\n'
            '<｜DSML｜parameter name="c" string="true">Oslo</｜DSML｜parameter>') in prompt
    assert prompt.endswith("<｜User｜><tool_result>9 C</tool_result>\n\nand?<｜Assistant｜></think>")


def test_error_bodies():
    err = APIError(400, "bad", param="messages[0].role", code="invalid_messages")
    assert openai_body(err) == {"error": {"message": "bad", "type": "invalid_request_error",
                                          "param": "messages[0].role", "code": "invalid_messages"}}
    assert anthropic_body(err) == {"type": "error", "error": {"type": "invalid_request_error",
                                                              "message": "messages[0].role: bad"}}
    assert anthropic_body(APIError(503, "busy"))["error"]["type"] == "overloaded_error"
