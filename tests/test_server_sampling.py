"""Requests with sampling parameters the model cannot use, and tool-call arguments that are
not strict JSON, against a live server: clear 400s, strict JSON out, and the server keeps
sampling for the next request."""

import json

import httpx
import pytest

from strict_json import strict_json
from test_server_support import API_KEY, MODEL, checkpoint_dir, shared_server

HEADERS = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
USER = [{"role": "user", "content": "tell me something"}]
ENDPOINTS = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "max_tokens": 3},
    "/v1/completions": {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3},
    "/v1/messages": {"model": MODEL, "messages": USER, "max_tokens": 3},
}
STOP_FIELD = {"/v1/chat/completions": "stop", "/v1/completions": "stop", "/v1/messages": "stop_sequences"}
WEATHER_OPENAI = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
WEATHER_ANTHROPIC = {"name": "get_weather", "input_schema": WEATHER_OPENAI["function"]["parameters"]}


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, headers=HEADERS, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def vocab_size(server):
    return json.loads((checkpoint_dir() / "config.json").read_text())["vocab_size"]


def error_names(endpoint, response, field):
    assert response.status_code == 400, response.text
    body = strict_json(response.text)
    if endpoint == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        message = body["error"]["message"]
        assert message.startswith(f"{field}: ") and f"'{field}'" not in message, message  # named once
    else:
        assert body["error"]["param"] == field and f"'{field}'" in body["error"]["message"]
    return body


def sampled_request_succeeds(http, endpoint):
    r = http.post(endpoint, json={**ENDPOINTS[endpoint], "temperature": 0.9})
    assert r.status_code == 200, r.text
    usage = strict_json(r.text)["usage"]
    assert usage.get("completion_tokens", usage.get("output_tokens")) == 3


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_top_k_beyond_the_vocabulary_is_a_400_and_sampling_still_works(http, server, endpoint, vocab_size):
    for top_k in (vocab_size, vocab_size + 1000):
        r = http.post(endpoint, json={**ENDPOINTS[endpoint], "temperature": 0.9, "top_k": top_k})
        body = error_names(endpoint, r, "top_k")
        assert str(vocab_size) in json.dumps(body)
    sampled_request_succeeds(http, endpoint)
    r = http.post(endpoint, json={**ENDPOINTS[endpoint], "stream": True, "temperature": 0.9, "top_k": vocab_size})
    error_names(endpoint, r, "top_k")
    sampled_request_succeeds(http, endpoint)
    assert server.health()["failed"] == 0


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_stop_string_limits_are_a_400_naming_the_field(http, endpoint):
    field = STOP_FIELD[endpoint]
    body = error_names(endpoint, http.post(endpoint, json={**ENDPOINTS[endpoint], field: ["x"] * 17}), field)
    assert "16" in json.dumps(body)
    body = error_names(endpoint, http.post(endpoint, json={**ENDPOINTS[endpoint], field: ["ok", "y" * 1025]}), field)
    assert "1024" in json.dumps(body)
    r = http.post(endpoint, json={**ENDPOINTS[endpoint], field: ["z" * 1024] * 16})
    assert r.status_code == 200, r.text


def test_non_finite_numbers_in_a_request_body_are_invalid_json(http):
    body = b'{"model": "tiny-v4", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'
    r = http.post("/v1/chat/completions", content=body)
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]


def sse_payloads(response):
    """Every SSE data payload, each parsed as strict JSON."""
    assert response.status_code == 200, response.text
    return [strict_json(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


NON_FINITE_PROBES = [("nan-argument-probe", "NaN"), ("overflow-argument-probe", "1e999")]


def tool_call_replies(http, endpoint, tool, probe):
    """The whole reply and the streamed events, as strict JSON, for a request whose scripted
    completion calls get_weather."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": probe}], "tools": [tool], "max_tokens": 80}
    r = http.post(endpoint, json=body)
    assert r.status_code == 200, r.text
    return strict_json(r.text), sse_payloads(http.post(endpoint, json={**body, "stream": True}))


@pytest.mark.parametrize("probe, value", NON_FINITE_PROBES)
def test_openai_tool_arguments_are_strict_json(http, probe, value):
    reply, chunks = tool_call_replies(http, "/v1/chat/completions", WEATHER_OPENAI, probe)
    (call,) = reply["choices"][0]["message"]["tool_calls"]
    assert strict_json(call["function"]["arguments"]) == {"city": "Paris", "days": value}
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    arguments = "".join(tc["function"].get("arguments", "") for c in chunks for choice in c["choices"]
                        for tc in choice["delta"].get("tool_calls", []))
    assert strict_json(arguments) == {"city": "Paris", "days": value}


@pytest.mark.parametrize("probe, value", NON_FINITE_PROBES)
def test_anthropic_tool_arguments_are_strict_json(http, probe, value):
    reply, events = tool_call_replies(http, "/v1/messages", WEATHER_ANTHROPIC, probe)
    assert reply["stop_reason"] == "tool_use"
    assert [b["input"] for b in reply["content"] if b["type"] == "tool_use"] == [{"city": "Paris", "days": value}]
    partial = "".join(e["delta"]["partial_json"] for e in events
                      if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert strict_json(partial) == {"city": "Paris", "days": value}
