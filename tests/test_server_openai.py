"""The OpenAI-compatible endpoints, driven by the official ``openai`` client against a live server."""

import json

import httpx
import openai
import pytest

from test_server_support import API_KEY, MODEL, openai_client, shared_server

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
LOOKUP_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def user(text):
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = server.health()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_plain_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=user("hi there"), max_tokens=4)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 4 and r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_scripted_text_and_eos(client):
    r = client.chat.completions.create(model=MODEL, messages=user("hello-probe"), max_tokens=20)
    assert r.choices[0].message.content == "Hello there!"
    assert r.choices[0].finish_reason == "stop"


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model=MODEL, messages=user("stream me something"), max_tokens=6, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] or finals == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6


def test_tool_call(client):
    r = client.chat.completions.create(model=MODEL, messages=user("weather-probe in Paris?"), tools=[WEATHER_TOOL],
                                       max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}

    # the call goes back with its result: the conversation encodes and the server answers
    messages = user("weather-probe in Paris?") + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    follow = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=80)
    assert follow.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_calls_are_incremental_and_never_leak_dsml(client):
    stream = client.chat.completions.create(model=MODEL, messages=user("two-calls-probe"),
                                            tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=120, stream=True)
    content, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            if tc.function.name:
                entry["name"] += tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Checking both."
    assert "DSML" not in content
    assert finish == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Oslo"}
    assert json.loads(calls[1]["arguments"]) == {"zone": "CET"}
    assert calls[0]["id"] != calls[1]["id"]


def test_named_tool_choice_forces_the_call(client):
    r = client.chat.completions.create(
        model=MODEL, messages=user("named-probe"), tools=[WEATHER_TOOL, LOOKUP_TOOL], max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "lookup"}},
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"q": "mlx"}
    assert r.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_hides_the_tools(client):
    with_tools = client.chat.completions.create(model=MODEL, messages=user("x"), tools=[WEATHER_TOOL], max_tokens=1)
    without = client.chat.completions.create(model=MODEL, messages=user("x"), tools=[WEATHER_TOOL],
                                             tool_choice="none", max_tokens=1)
    assert without.usage.prompt_tokens < with_tools.usage.prompt_tokens


def test_reasoning_content(client):
    r = client.chat.completions.create(model=MODEL, messages=user("reasoning-probe: 2+2?"), max_tokens=40,
                                       reasoning_effort="high")
    message = r.choices[0].message
    assert message.content == "The answer is 4."
    assert message.model_extra["reasoning_content"] == "Two plus two is four."

    stream = client.chat.completions.create(model=MODEL, messages=user("reasoning-probe: 2+2?"), max_tokens=40,
                                            stream=True, extra_body={"thinking": {"type": "enabled"}})
    reasoning, content = "", ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == ("Two plus two is four.", "The answer is 4.")


def test_thinking_then_tool_call(client):
    r = client.chat.completions.create(model=MODEL, messages=user("think-tool-probe"), tools=[WEATHER_TOOL],
                                       max_tokens=80, reasoning_effort="max")
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == "The user wants weather."
    assert message.tool_calls[0].function.name == "get_weather"


def test_response_format_is_rendered_into_the_prompt(client):
    plain = client.chat.completions.create(model=MODEL, messages=user("json-probe"), max_tokens=20)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    shaped = client.chat.completions.create(
        model=MODEL, messages=user("json-probe"), max_tokens=20,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    )
    assert json.loads(shaped.choices[0].message.content) == {"ok": True}
    assert shaped.usage.prompt_tokens > plain.usage.prompt_tokens + 10
    obj = client.chat.completions.create(model=MODEL, messages=user("json-probe"), max_tokens=20,
                                         response_format={"type": "json_object"})
    assert obj.usage.prompt_tokens > plain.usage.prompt_tokens


def test_stop_sequence(client):
    r = client.chat.completions.create(model=MODEL, messages=user("stop-probe"), max_tokens=20, stop=[" gamma"])
    assert r.choices[0].message.content == "alpha beta"
    assert r.choices[0].finish_reason == "stop"


def test_follow_up_reuses_the_prompt_cache(client):
    first = user("cache-probe: the first turn of a conversation")
    a = client.chat.completions.create(model=MODEL, messages=first, max_tokens=3)
    messages = first + [{"role": "assistant", "content": a.choices[0].message.content},
                        {"role": "user", "content": "and the second"}]
    b = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached >= a.usage.prompt_tokens - 1
    assert cached < b.usage.prompt_tokens


def test_raw_completions(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, stream=True,
                                         temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=[0, 1000, 2000], max_tokens=2)
    assert by_ids.usage.prompt_tokens == 3


def test_errors(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-nothing", messages=user("x"), max_tokens=1)
    assert err.value.body["code"] == "model_not_found"

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=1)
    assert err.value.body["param"].startswith("messages[0]")

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=user("x"), max_tokens="many")
    assert err.value.body["param"] == "max_tokens"

    bad_schema = {"type": "function", "function": {"name": "f", "parameters": "not a schema"}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=user("x"), tools=[bad_schema], max_tokens=1)
    assert "parameters" in err.value.body["param"]

    fit = server.health()["max_kv_tokens"]  # the memory guard (--max-kv-size)
    assert 0 < fit < 50_000
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=user("word " * (fit + 10)), max_tokens=1)
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=fit + 10)
    assert err.value.body["param"] == "max_tokens"

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0).models.list()

    r = httpx.post(server.base + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(server.base + "/v1/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    # still serving
    assert client.chat.completions.create(model=MODEL, messages=user("hello-probe"), max_tokens=9).choices[0].message.content


def test_the_trained_model_calls_a_tool_and_answers_from_its_result_through_the_client(tmp_path):
    """No script: the tiny trained model writes the DSML call the client receives, then reads the
    tool's result the client sends back."""
    from mlx_dsv4.agent.tools import as_tool
    from mlx_dsv4.train import data, trained_checkpoint
    from test_server_support import ServerProcess

    server = ServerProcess(["--temperature", "0", "--max-tokens", "96"], model=trained_checkpoint(), root=tmp_path)
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        tools = [as_tool(data.get_weather).schema(), as_tool(data.calculate).schema()]
        messages = [{"role": "system", "content": data.WEATHER_SYSTEM},
                    {"role": "user", "content": "What is the weather in Paris?"}]
        first = client.chat.completions.create(model=model, messages=messages, tools=tools).choices[0]
        assert first.finish_reason == "tool_calls"
        (call,) = first.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        result = {"city": "Paris", "temperature": 18.5, "units": "celsius", "conditions": "light rain"}
        messages += [first.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
        final = client.chat.completions.create(model=model, messages=messages, tools=tools).choices[0]
        assert final.finish_reason == "stop"
        assert final.message.content == 'Paris is at 18.5 °C with "light rain".'
    finally:
        server.stop()
