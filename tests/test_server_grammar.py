"""Grammar-constrained output against a live server: the random tiny model, sampled at
temperature 1 with unscripted prompts, must still produce JSON that validates against the
requested schema, and tool calls whose arguments validate against the tool's schema."""

import json

import httpx
import jsonschema
import pytest

from test_server_support import API_KEY, MODEL, anthropic_client, openai_client, shared_server

SAMPLES = 20
MAX_TOKENS = 400  # far above what the schemas below allow, so only the grammar ends a reply

# Every property required and no others: every valid reply is short and complete.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"enum": ["ada", "bob", "cy"]},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"role": {"enum": ["admin", "user"]}, "level": {"type": "integer", "minimum": 1, "maximum": 5}},
            "required": ["role", "level"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "tags", "owner"],
    "additionalProperties": False,
}
BOOK = {
    "type": "function",
    "function": {
        "name": "book",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Oslo", "Rome"]},
                "guests": {"type": "array", "maxItems": 2, "items": {
                    "type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
                    "required": ["age"], "additionalProperties": False}},
            },
            "required": ["city", "guests"],
            "additionalProperties": False,
        },
    },
}
CANCEL = {
    "type": "function",
    "function": {"name": "cancel", "parameters": {
        "type": "object", "properties": {"urgent": {"type": "boolean"}}, "required": ["urgent"],
        "additionalProperties": False}},
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (BOOK, CANCEL)}


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def messages(text):
    return [{"role": "user", "content": text}]


def valid_json(text, schema):
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def valid_calls(message, schemas):
    calls = message.tool_calls or []
    return bool(calls) and all(
        c.function.name in schemas and valid_json(c.function.arguments, schemas[c.function.name]) for c in calls)


def person_format(strict=True):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def test_json_schema_replies_validate_and_without_it_the_same_seeds_do_not(client):
    constrained, free = [], []
    for seed in range(SAMPLES):
        r = client.chat.completions.create(model=MODEL, messages=messages("Describe a person as JSON."),
                                           temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
                                           response_format=person_format())
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        constrained.append(r.choices[0].message.content)
    for seed in range(10):
        r = client.chat.completions.create(model=MODEL, messages=messages("Describe a person as JSON."),
                                           temperature=1.0, seed=seed, max_tokens=12)
        free.append(r.choices[0].message.content)
    assert all(valid_json(text, PERSON) for text in constrained), [t for t in constrained if not valid_json(t, PERSON)]
    assert len(set(constrained)) > 10  # sampled, not one forced answer
    assert not any(valid_json(text, PERSON) for text in free)


def test_json_object_reply_is_an_object_also_streamed(client):
    stream = client.chat.completions.create(model=MODEL, messages=messages("Any object please."), temperature=1.0,
                                            seed=3, max_tokens=30, response_format={"type": "json_object"},
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    # The random model may write a long object; it must be an object as far as it went.
    assert text.startswith("{")


def test_required_tool_choice_calls_validate_and_without_it_the_same_seeds_do_not(client):
    for seed in range(SAMPLES):
        r = client.chat.completions.create(model=MODEL, messages=messages("Book me something."), temperature=1.0,
                                           seed=seed, max_tokens=MAX_TOKENS, tools=[BOOK, CANCEL],
                                           tool_choice="required")
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls", message
        assert valid_calls(message, SCHEMAS), message.tool_calls
    for seed in range(10):
        r = client.chat.completions.create(model=MODEL, messages=messages("Book me something."), temperature=1.0,
                                           seed=seed, max_tokens=12, tools=[BOOK, CANCEL])
        assert not valid_calls(r.choices[0].message, SCHEMAS)


def test_named_tool_choice_calls_that_tool_once(client):
    for seed in range(5):
        r = client.chat.completions.create(model=MODEL, messages=messages("Cancel it."), temperature=1.0, seed=seed,
                                           max_tokens=MAX_TOKENS, tools=[BOOK, CANCEL],
                                           tool_choice={"type": "function", "function": {"name": "book"}})
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "book"
        assert valid_json(calls[0].function.arguments, SCHEMAS["book"])


def test_anthropic_output_format_and_forced_tool(server):
    client = anthropic_client(server)
    for seed in range(3):
        r = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=messages("A person, please."),
                                   extra_body={"temperature": 1.0, "seed": seed,
                                               "output_config": {"format": {"type": "json_schema", "schema": PERSON}}})
        assert r.stop_reason == "end_turn"
        assert valid_json(r.content[0].text, PERSON), r.content
    anthropic_tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in (BOOK, CANCEL)]
    for seed in range(3):
        for choice in ({"type": "any"}, {"type": "tool", "name": "cancel"}):
            r = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, tools=anthropic_tools, tool_choice=choice,
                                       messages=messages("Do it."), extra_body={"temperature": 1.0, "seed": seed})
            uses = [b for b in r.content if b.type == "tool_use"]
            assert r.stop_reason == "tool_use" and uses
            for use in uses:
                jsonschema.validate(use.input, SCHEMAS[use.name])
            if choice["type"] == "tool":
                assert [u.name for u in uses] == ["cancel"]


def post(server, path, body):
    return httpx.post(server.base + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def test_a_strict_schema_that_cannot_be_enforced_is_refused(server):
    bad = {"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}, "required": ["a"]}
    body = {"model": MODEL, "messages": messages("hi"), "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": bad, "strict": True}}}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and "no-such-format" in error["message"]
    # Not strict: the keyword is ignored and the rest of the schema still applies.
    body["response_format"]["json_schema"]["strict"] = False
    body["max_tokens"] = 20
    r = post(server, "/v1/chat/completions", {**body, "temperature": 0})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert content.startswith('{"a": "')


def test_anthropic_prefill_that_does_not_fit_the_format_is_refused(server):
    body = {"model": MODEL, "max_tokens": 8, "output_config": {"format": {"type": "json_schema", "schema": PERSON}},
            "messages": messages("hi") + [{"role": "assistant", "content": "Sure:"}]}
    r = post(server, "/v1/messages", body)
    assert r.status_code == 400, r.text
    assert "output_config.format.schema" in r.json()["error"]["message"]
