"""Malformed request bodies against the app in-process (the real engine on the tiny model, every
completion scripted to end at once): each gets a 4xx naming the field, never a 500."""

import asyncio
import copy
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_dsv4.sampling import SamplingParams
from mlx_dsv4.server.app import Context, create_app
from mlx_dsv4.server.engine import Engine
from test_server_support import MODEL, checkpoint_dir

OPENAI_TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
    "type": "object", "properties": {"a": {"type": "string"}}}}}
BODIES = {
    "chat": ("/v1/chat/completions", {
        "model": MODEL, "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.05,
        "repetition_penalty": 1.1, "seed": 3, "stop": ["zz"], "n": 1, "logprobs": False, "frequency_penalty": 0,
        "stream_options": {"include_usage": True}, "reasoning_effort": "low", "chat_template_kwargs": {"thinking": True},
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        "tools": [OPENAI_TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}},
        "messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "x", "reasoning_content": "r",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": \"b\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "res"}, {"role": "user", "content": "go", "name": "u"}]}),
    "completion": ("/v1/completions", {
        "model": MODEL, "prompt": "hello", "max_tokens": 2, "stop": "zz", "temperature": 0.2, "seed": 1,
        "echo": False, "suffix": None, "logprobs": None, "stream_options": {"include_usage": True}}),
    "completion_ids": ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}),
    "messages": ("/v1/messages", {
        "model": MODEL, "max_tokens": 2, "system": [{"type": "text", "text": "s"}], "temperature": 0.5, "top_k": 5,
        "top_p": 0.9, "stop_sequences": ["zz"], "metadata": {"user_id": "u"},
        "thinking": {"type": "enabled", "budget_tokens": 100},
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {"a": {}}}}],
        "tool_choice": {"type": "tool", "name": "f"},
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": ""},
                                              {"type": "text", "text": "x"},
                                              {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": "b"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": False,
                                          "content": [{"type": "text", "text": "r"}]},
                                         {"type": "text", "text": "go"}]}]}),
    "prefill": ("/v1/messages", {
        "model": MODEL, "max_tokens": 2, "system": "s",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]}),
    "count": ("/v1/messages/count_tokens", {"model": MODEL, "system": "s", "messages": [{"role": "user", "content": "hi"}]}),
}


def paths(value, prefix=()):
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, prefix + (i,))


TARGETS = [(name, path) for name, (_, body) in BODIES.items() for path in paths(body)]


def with_value(body, path, value, delete=False):
    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    if delete and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return body


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    script = tmp_path_factory.mktemp("script") / "script.json"
    script.write_text(json.dumps([{"match": "", "completion": ""}]))  # every reply: EOS at once
    engine = Engine(checkpoint_dir(), kv_cache_limit=60_000_000, script_path=str(script))
    engine.start()
    ctx = Context(engine, MODEL, SamplingParams(max_tokens=8),
                  max_context=engine.model.args.max_position_embeddings)
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://127.0.0.1:8080",
                               timeout=60)

    def post(path, body, headers=None):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return loop.run_until_complete(client.post(path, content=content,
                                                   headers=headers or {"content-type": "application/json"}))

    post.engine = engine
    yield post
    loop.run_until_complete(client.aclose())
    loop.close()
    engine.stop()


def named_field(path, response):
    """The field a 4xx error names (``param`` in OpenAI errors, the message's prefix in Anthropic's)."""
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error" or \
            response.status_code == 404, body
        field, sep, _ = body["error"]["message"].partition(": ")
        assert sep and " " not in field, body
        return field
    assert body["error"]["param"], body
    return body["error"]["param"]


def top(field):
    return field.split(".")[0].split("[")[0]


@pytest.mark.parametrize("name", ["chat", "completion", "messages"])
@pytest.mark.parametrize("seed", [-1, -(2**70), 2**64, 10**30])
def test_seed_out_of_range_is_a_400(app, name, seed):
    path, body = BODIES[name]
    r = app(path, {**body, "seed": seed})
    assert named_field(path, r) == "seed" and "2**64" in r.text


LONE_SURROGATES = [
    ("chat", ("messages", 1, "content", 0, "text"), "messages[1].content[0].text"),
    ("chat", ("messages", 4, "content"), "messages[4].content"),
    ("chat", ("tools", 0, "function", "description"), "tools[0].function.description"),
    ("completion", ("prompt",), "prompt"),
    ("messages", ("system", 0, "text"), "system[0].text"),
    ("messages", ("messages", 1, "content", 2, "input", "a"), "messages[1].content[2].input.a"),
    ("count", ("messages", 0, "content"), "messages[0].content"),
]


@pytest.mark.parametrize("name, where, field", LONE_SURROGATES)
@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udc00\ud800"])
def test_a_lone_surrogate_is_a_400_naming_where_it_is(app, name, where, field, text):
    path, body = BODIES[name]
    r = app(path, with_value(body, where, text))
    assert named_field(path, r) == field and "surrogate" in r.text
    pair = with_value(body, where, "\ud83d\ude00")  # an escaped pair is one character
    assert app(path, pair).status_code == 200


def test_a_lone_surrogate_in_a_key_is_a_400(app):
    path, body = BODIES["messages"]
    r = app(path, with_value(body, ("messages", 1, "content", 2, "input"), {"\ud800": 1}))
    assert named_field(path, r) == "messages[1].content[2].input"


@pytest.mark.parametrize("role", [[], {}, ["user"], {"role": "user"}, 5, None])
def test_a_role_that_is_not_a_string_is_a_400(app, role):
    path, body = BODIES["chat"]
    r = app(path, with_value(body, ("messages", 1, "role"), role))
    assert named_field(path, r) == "messages[1].role"


@pytest.mark.parametrize("name, where, field", [("chat", ("tool_choice", "function", "name"), "tool_choice"),
                                                ("messages", ("tool_choice", "name"), "tool_choice.name")])
@pytest.mark.parametrize("value", [[], {}, ["f"], 5])
def test_a_tool_choice_name_that_is_not_a_string_is_a_400(app, name, where, field, value):
    path, body = BODIES[name]
    assert named_field(path, app(path, with_value(body, where, value))) == field


@pytest.mark.parametrize("value", [10**400, -(10**400), 0, -1])
def test_repetition_penalty_must_be_a_positive_float(app, value):
    path, body = BODIES["chat"]
    assert named_field(path, app(path, {**body, "repetition_penalty": value})) == "repetition_penalty"


@pytest.mark.parametrize("value", [2, 2**64, 10**30])
def test_a_large_integer_repetition_penalty_is_used_as_a_float(app, value):
    path, body = BODIES["chat"]
    r = app(path, {**body, "repetition_penalty": value})
    assert r.status_code == 200, r.text


def test_a_json_post_without_a_json_content_type_does_no_work(app):
    path, body = BODIES["chat"]
    before = app.engine.stats()["completed"]
    for declared in ("text/plain", "application/x-www-form-urlencoded"):
        r = app(path, body, headers={"content-type": declared})
        assert r.status_code == 415 and declared in r.json()["error"]["message"]
    assert app.engine.stats()["completed"] == before


text = st.text(st.characters(exclude_categories=()), max_size=12)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**80), 2**80)
           | st.floats(allow_nan=False, allow_infinity=False) | text
           | st.sampled_from(["", "user", "assistant", "tool", "system", "text", "tool_use", "tool_result", "auto",
                              "none", "required", "any", "tool", "function", "enabled", "disabled", "json_object",
                              "json_schema", "object", "f", "c1", "t1", "<｜User｜>", "\ud800"]))
keys = st.sampled_from(["type", "text", "name", "content", "role", "id", "input", "function", "arguments", "schema",
                        "properties", "tool_use_id", "x"]) | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=8)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(target=st.sampled_from(TARGETS), value=values, delete=st.booleans(), stream=st.booleans())
def test_fuzzed_fields_get_a_4xx_naming_a_field_or_a_normal_reply(app, target, value, delete, stream):
    name, where = target
    path, base = BODIES[name]
    body = with_value(base, where, value, delete)
    if stream and name != "count":
        body["stream"] = True
    r = app(path, body)
    if r.status_code == 200:
        assert "error" not in r.text, r.text[:500]  # no error in-band either
        return
    assert top(named_field(path, r)) in set(body) | {where[0]}
