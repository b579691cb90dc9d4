"""Malformed requests, client disconnects, and concurrent load against a live server."""

import json
import random
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_server_support import API_KEY, MODEL, openai_client, shared_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

HEADERS = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
MESSAGES = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 1}


@pytest.fixture(scope="module")
def server():
    return shared_server()


def with_field(body, path, value):
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def malformed_bodies():
    """(endpoint, raw body bytes) pairs that are each invalid."""
    raw = [b"", b"   ", b"{", b"[1, 2]", b'"text"', b"null", b"42", b"\xff\xfe\x00", b'{"model": NaN}',
           b'{"model": "x", }', b"{" * 5000 + b"}" * 5000, b'{"a": Infinity}', b"\x00" * 64]
    cases = [(endpoint, body) for endpoint in ("/v1/chat/completions", "/v1/messages", "/v1/completions")
             for body in raw]
    junk = [None, 0, -1, 1.5, True, "x", "", [], {}, [None], {"a": 1}, "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
    wrong = {
        "/v1/chat/completions": [
            (("model",), [123, None, "other-model"]),
            (("messages",), ["hi", [], [1], [{"role": "wizard", "content": "x"}], [{"content": "x"}],
                             [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                             [{"role": "user", "content": "a \ufdd0 b"}],
                             [{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
                             [{"role": "tool", "content": "x"}]]),
            (("max_tokens",), [0, -5, "10", 1.5, True, 10**12]),
            (("temperature",), [-1, 3, "hot", True]),
            (("top_p",), [2, "x"]),
            (("stop",), [5, [1, 2], [""], ["a"] * 40]),
            (("stream",), ["yes", 1]),
            (("n",), [2, "1"]),
            (("tools",), ["x", [1], [{"type": "retrieval"}], [{"type": "function", "function": {"name": 5}}],
                          [{"type": "function", "function": {"name": "bad name!"}}],
                          [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]]),
            (("tool_choice",), ["sometimes", "required", {"type": "function", "function": {"name": "missing"}}]),
            (("response_format",), ["json", {"type": "yaml"}, {"type": "json_schema", "json_schema": {"schema": 3}}]),
            (("reasoning_effort",), ["extreme", 3]),
            (("thinking",), ["on", {"type": "sometimes"}]),
            (("seed",), ["s", 1.5]),
        ],
        "/v1/messages": [
            (("model",), [None, 7]),
            (("max_tokens",), [None, 0, "1"]),
            (("messages",), [[], "hi", [{"role": "system", "content": "x"}], [{"role": "user"}],
                             [{"role": "user", "content": [{"type": "image", "source": {}}]}],
                             [{"role": "user", "content": [{"type": "tool_result"}]}],
                             [{"role": "user", "content": [{"type": "text"}]}],
                             [{"role": "user", "content": 5}]]),
            (("system",), [5, [{"type": "image"}]]),
            (("temperature",), [1.5, "x"]),
            (("stop_sequences",), ["", [3]]),
            (("tools",), [[{"name": "f"}], [{"name": "f", "input_schema": []}], [{"type": "bash_20250124", "name": "bash"}]]),
            (("tool_choice",), [{"type": "tool", "name": "nope"}, {"type": "any"}, "auto"]),
            (("thinking",), [{"type": "maybe"}, {"type": "enabled", "budget_tokens": -1}, True]),
        ],
        "/v1/completions": [
            (("prompt",), [None, 5, [], [1.5], [-1], [10**9], {"text": "x"}]),
            (("max_tokens",), [0, "x"]),
            (("echo",), [True]),
            (("model",), ["nope"]),
        ],
    }
    bases = {"/v1/chat/completions": CHAT, "/v1/messages": MESSAGES, "/v1/completions": COMPLETION}
    for endpoint, fields in wrong.items():
        for path, values in fields:
            for value in values:
                body = {k: v for k, v in bases[endpoint].items() if not (value is None and k == path[0])}
                if value is not None:
                    body = with_field(body, path, value)
                cases.append((endpoint, json.dumps(body).encode()))
    rng = random.Random(7)
    for endpoint, base in bases.items():
        for _ in range(10):  # a valid field replaced by junk of another type
            key = rng.choice([k for k in base if k != "max_tokens"])
            value = rng.choice([j for j in junk if type(j) is not type(base[key])])
            cases.append((endpoint, json.dumps(with_field(base, (key,), value)).encode()))
    return cases


def check_error_shape(endpoint, response):
    assert 400 <= response.status_code < 600, (endpoint, response.status_code, response.text[:200])
    body = response.json()
    if endpoint.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
        assert isinstance(body["error"]["type"], str)
    else:
        assert isinstance(body["error"]["message"], str) and "type" in body["error"], body


def test_malformed_bodies_get_json_errors_and_the_server_keeps_serving(server):
    cases = malformed_bodies()
    assert len(cases) > 120
    with httpx.Client(base_url=server.base, headers=HEADERS, timeout=30) as http:
        for endpoint, body in cases:
            check_error_shape(endpoint, http.post(endpoint, content=body))
        # byte-level corruption of valid bodies: each is an error or (if it stayed valid) a normal reply
        rng = random.Random(11)
        for _ in range(60):
            endpoint, base = rng.choice([("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGES)])
            data = bytearray(json.dumps(base).encode())
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.choice(b'{}[]",:0x\\\x00\xff')
            r = http.post(endpoint, content=bytes(data))
            if r.status_code != 200:
                check_error_shape(endpoint, r)
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert server.alive()
    health = server.health()
    assert health["pending"] == 0 and health["failed"] == 0


def test_error_shapes_for_routes_and_methods(server):
    with httpx.Client(base_url=server.base, headers=HEADERS, timeout=30) as http:
        check_error_shape("/v1/nope", http.get("/v1/nope"))
        check_error_shape("/v1/chat/completions", http.get("/v1/chat/completions"))
        check_error_shape("/v1/messages", http.put("/v1/messages", content=b"{}"))
        r = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        check_error_shape("/v1/chat/completions", r)


def _stream_until(server, body, n_chunks):
    """Open a streaming request, read ``n_chunks`` SSE events, then drop the connection."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    received = b""
    while received.count(b"data: ") < n_chunks:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the stream early"
        received += chunk
    sock.close()
    return received


def wait_idle(server, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = server.health()
        if health["pending"] == 0 and not health["active"]:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the server is still busy: {server.health()}")


def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.health()["cancelled"]
    body = {**CHAT, "max_tokens": 2000, "stream": True, "messages": [{"role": "user", "content": "a long story"}]}
    head = _stream_until(server, body, 3)
    assert b"200 OK" in head.split(b"\r\n")[0]
    t0 = time.perf_counter()
    health = wait_idle(server)
    assert time.perf_counter() - t0 < 3, "the abandoned generation kept running"
    assert health["cancelled"] == before + 1

    # a non-streaming request whose client leaves while it runs is cancelled too
    sock = socket.create_connection(("127.0.0.1", server.port))
    payload = json.dumps({**CHAT, "max_tokens": 2000}).encode()
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode()
                 + f"Authorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    deadline = time.time() + 10
    while not server.health()["active"] and time.time() < deadline:
        time.sleep(0.05)
    sock.close()
    health = wait_idle(server)
    assert health["cancelled"] == before + 2
    r = openai_client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello-probe"}],
                                                      max_tokens=9)
    assert r.choices[0].message.content == "Hello there!"


def test_concurrent_streaming_load(server):
    from server_load import report, run_load

    openai_client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "warm"}],
                                                  max_tokens=3)
    wait_idle(server)
    stats = run_load(server.base, MODEL, api_key=API_KEY, clients=16, requests=4, max_tokens=3, deadline_s=90)
    print("\nserver load:", report(stats))
    assert stats["failures"] == []
    assert stats["completed"] == 64 and all(r in ("length", "stop") for r in stats["finish_reasons"])
    assert stats["wall_s"] < 90
    after = wait_idle(server)
    before_mem, after_mem = stats["health_before"]["memory"], after["memory"]
    assert after_mem["active_bytes"] - before_mem["active_bytes"] < 32 * 2**20
    assert after_mem["rss_bytes"] - before_mem["rss_bytes"] < 128 * 2**20
