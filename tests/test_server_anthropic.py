"""The Anthropic Messages endpoint, driven by the official ``anthropic`` client against a live server."""

import anthropic
import httpx
import pytest

from test_server_support import API_KEY, MODEL, anthropic_client, shared_server

WEATHER = {"name": "get_weather", "description": "Current weather",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}
LOOKUP = {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return anthropic_client(server)


def user(text):
    return [{"role": "user", "content": text}]


def test_plain_message(client):
    m = client.messages.create(model=MODEL, max_tokens=20, system="Be brief.", messages=user("hello-probe"))
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == "Hello there!"
    assert m.stop_reason == "end_turn"
    assert m.usage.output_tokens > 0 and m.usage.input_tokens > 0


def test_max_tokens_and_stop_sequence(client):
    m = client.messages.create(model=MODEL, max_tokens=2, messages=user("anything"))
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2
    m = client.messages.create(model=MODEL, max_tokens=20, messages=user("stop-probe"), stop_sequences=[" gamma"])
    assert m.content[0].text == "alpha beta"
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == " gamma"


def test_streaming_text(client):
    with client.messages.stream(model=MODEL, max_tokens=20, messages=user("hello-probe")) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "Hello there!"
    assert final.content[0].text == "Hello there!" and final.stop_reason == "end_turn"


def test_tool_use_round_trip(client):
    m = client.messages.create(model=MODEL, max_tokens=80, tools=[WEATHER], messages=user("weather-probe"))
    assert m.stop_reason == "tool_use"
    (block,) = [b for b in m.content if b.type == "tool_use"]
    assert block.name == "get_weather" and block.input == {"city": "Paris", "days": 3}
    assert block.id.startswith("toolu_")
    assert all(b.type != "text" or "DSML" not in b.text for b in m.content)

    follow = client.messages.create(
        model=MODEL, max_tokens=4, tools=[WEATHER],
        messages=user("weather-probe") + [
            {"role": "assistant", "content": [b.model_dump() for b in m.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "21 C"},
                                         {"type": "text", "text": "thanks"}]},
        ],
    )
    assert follow.role == "assistant"


def test_streamed_tool_use(client):
    with client.messages.stream(model=MODEL, max_tokens=120, tools=[WEATHER, {"name": "get_time", "input_schema": {
            "type": "object", "properties": {"zone": {"type": "string"}}}}], messages=user("two-calls-probe")) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == "Checking both."
    assert [b.input for b in final.content[1:]] == [{"city": "Oslo"}, {"zone": "CET"}]
    assert final.stop_reason == "tool_use"


def test_forced_tool(client):
    m = client.messages.create(model=MODEL, max_tokens=60, tools=[WEATHER, LOOKUP], messages=user("named-probe"),
                               tool_choice={"type": "tool", "name": "lookup"})
    assert [(b.type, b.name, b.input) for b in m.content] == [("tool_use", "lookup", {"q": "mlx"})]


def test_thinking_blocks(client):
    m = client.messages.create(model=MODEL, max_tokens=40, messages=user("reasoning-probe"),
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "Two plus two is four." and m.content[1].text == "The answer is 4."

    with client.messages.stream(model=MODEL, max_tokens=80, messages=user("think-tool-probe"), tools=[WEATHER],
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    assert final.content[0].thinking == "The user wants weather."
    # thinking blocks sent back become the turn's reasoning
    follow = client.messages.create(
        model=MODEL, max_tokens=2, tools=[WEATHER], thinking={"type": "enabled", "budget_tokens": 1024},
        messages=user("think-tool-probe") + [
            {"role": "assistant", "content": [b.model_dump() for b in final.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": final.content[1].id, "content": "ok"}]},
        ])
    assert follow.content[0].type == "thinking"


def test_count_tokens(client):
    short = client.messages.count_tokens(model=MODEL, messages=user("hi"))
    longer = client.messages.count_tokens(model=MODEL, messages=user("hi"), tools=[WEATHER])
    assert 0 < short.input_tokens < longer.input_tokens


def test_errors(server, client):
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="claude-nothing", max_tokens=5, messages=user("x"))
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error"

    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "system", "content": "x"}])
    assert err.value.body["error"]["type"] == "invalid_request_error"

    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=5, messages=user("x"),
                               tools=[{"name": "f", "input_schema": "nope"}])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=5, messages=user("word " * (server.health()["max_kv_tokens"] + 10)))
    with pytest.raises(anthropic.AuthenticationError) as err:
        anthropic.Anthropic(base_url=server.base, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=user("x"))
    assert err.value.body["error"]["type"] == "authentication_error"

    r = httpx.post(server.base + "/v1/messages", json={"model": MODEL, "messages": user("x")},
                   headers={"x-api-key": API_KEY})
    # the field is named once, not as a prefix and again in the message
    assert r.status_code == 400 and r.json()["error"]["message"] == "max_tokens: is required"
    r = httpx.post(server.base + "/v1/messages", headers={"x-api-key": API_KEY},
                   json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and message.count("messages[0].content[0]") == 1, message


def count(server, **body):
    r = httpx.post(server.base + "/v1/messages/count_tokens", headers={"x-api-key": API_KEY},
                   json={"model": MODEL, **body})
    return r.status_code, r.json()


def test_thinking_between_tools_keeps_earlier_reasoning(server):
    history = user("first") + [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "a long line of earlier reasoning",
                                           "signature": ""}, {"type": "text", "text": "ok"}]},
    ] + user("second")
    status, enabled = count(server, messages=history, thinking={"type": "enabled", "budget_tokens": 1024})
    assert status == 200
    status, between = count(server, messages=history, thinking={"type": "between_tools"})
    assert status == 200
    # the release drops reasoning before the last user turn unless it is kept
    assert between["input_tokens"] > enabled["input_tokens"] + 5
    status, body = count(server, messages=history, thinking={"type": "sometimes"})
    message = body["error"]["message"]
    assert status == 400 and all(t in message for t in ("'enabled'", "'adaptive'", "'between_tools'", "'disabled'"))


def test_output_config_format_and_effort_reach_the_prompt(server):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    _, plain = count(server, messages=user("hi"))
    _, formatted = count(server, messages=user("hi"), output_config={"format": {"type": "json_schema", "schema": schema}})
    assert formatted["input_tokens"] > plain["input_tokens"] + 10
    thinking = {"type": "enabled", "budget_tokens": 1024}
    _, low = count(server, messages=user("hi"), thinking=thinking, output_config={"effort": "low"})
    _, high = count(server, messages=user("hi"), thinking=thinking, output_config={"effort": "max"})
    assert high["input_tokens"] > low["input_tokens"] + 50  # the release's maximum-effort paragraph
    status, body = count(server, messages=user("hi"), output_config={"verbosity": "low"})
    assert status == 400 and "output_config.verbosity" in body["error"]["message"]
    status, body = count(server, messages=user("hi"), output_config={"effort": "extreme"})
    assert status == 400 and "output_config.effort" in body["error"]["message"]


def test_streamed_usage_agrees_between_start_and_end(client):
    messages = user("hello-probe and a prompt long enough to be cached " * 4)
    for _ in range(2):  # the second request finds the prompt in the cache
        with client.messages.stream(model=MODEL, max_tokens=20, messages=messages) as stream:
            events = list(stream)
        start = next(e for e in events if e.type == "message_start").message.usage
        end = next(e for e in events if e.type == "message_delta").usage
        assert (start.input_tokens, start.cache_read_input_tokens) == (end.input_tokens, end.cache_read_input_tokens)
    assert end.cache_read_input_tokens > 0
