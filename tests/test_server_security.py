"""What a web page or another key holder can do to a local server: Host names it answers,
body types it takes, several API keys, and prompt-cache reuse kept within each key."""

import argparse
import socket

import anthropic
import httpx
import openai
import pytest

from mlx_dsv4.cli import serve
from test_server_support import MODEL, ServerProcess, script_env

KEY_A, KEY_B = "key-a", "key-b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello-probe"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(["--served-model-name", MODEL, "--temperature", "0", "--max-tokens", "8",
                            "--allowed-hosts", "proxy.example:8443, lan-box"],
                           env={**script_env(), "MLX_DSV4_API_KEY": f"{KEY_A}, {KEY_B}"})
    yield server
    server.stop()


def completed(server):
    return server.health()["completed"]


def test_only_the_names_of_the_bound_address_and_allowed_hosts_are_answered(server):
    port = server.port
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LocalHost:{port}", "127.0.0.1",
                     "lan-box", "lan-box:1234", "proxy.example:8443"):
            assert http.get("/health", headers={"Host": host}).status_code == 200, host
            r = http.get("/v1/models", headers={"Host": host, "Authorization": f"Bearer {KEY_A}"})
            assert r.status_code == 200, host
        before = completed(server)
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"localhost:{port + 1}",
                     "proxy.example", "proxy.example:9999", "lan-box.evil.example"):
            r = http.get("/health", headers={"Host": host})
            assert r.status_code == 421 and repr(host) in r.json()["error"]["message"], (host, r.text)
            r = http.post("/v1/chat/completions", json=CHAT, headers={"Host": host, "Authorization": f"Bearer {KEY_A}"})
            assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed"
            r = http.post("/v1/messages", json=CHAT, headers={"Host": host, "x-api-key": KEY_A})
            body = r.json()
            assert r.status_code == 421 and body["type"] == "error" and repr(host) in body["error"]["message"]
        assert completed(server) == before
    with socket.create_connection(("127.0.0.1", port)) as sock:  # HTTP/1.0 need not send a Host
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 421") and b"no Host header" in reply


def test_post_bodies_must_be_declared_json(server):
    auth = {"Authorization": f"Bearer {KEY_A}"}
    payload = httpx.Request("POST", "/", json=CHAT).content
    before = completed(server)
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for declared in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "application/json; charset=latin-1", "application/jsonx"):
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens"):
                r = http.post(path, content=payload, headers={**auth, "Content-Type": declared})
                assert r.status_code == 415, (declared, path, r.text)
                assert repr(declared) in r.text and "application/json" in r.text
        r = http.post("/v1/chat/completions", content=payload, headers=auth)
        assert r.status_code == 415 and "declares none" in r.json()["error"]["message"]
        assert completed(server) == before
        for declared in ("application/json", "Application/JSON; charset=utf-8"):
            r = http.post("/v1/chat/completions", content=payload, headers={**auth, "Content-Type": declared})
            assert r.status_code == 200, r.text
        # a text/plain request without a key is refused for the key first
        r = http.post("/v1/chat/completions", content=payload, headers={"Content-Type": "text/plain"})
        assert r.status_code == 401


def test_each_of_several_keys_is_accepted(server):
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for headers in ({"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"},
                        {"x-api-key": KEY_A}, {"x-api-key": KEY_B}):
            assert http.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200, headers
        for headers in ({}, {"Authorization": "Bearer key-c"}, {"Authorization": f"Bearer {KEY_A},{KEY_B}"},
                        {"x-api-key": f"{KEY_A}, {KEY_B}"}, {"Authorization": f"Bearer {KEY_A}x"}):
            r = http.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers


def test_api_key_flags_and_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    monkeypatch.setenv("MLX_DSV4_API_KEY", " one, two,,one ")
    assert serve.api_keys(parser.parse_args(["--model", "m"])) == ("one", "two")
    args = parser.parse_args(["--model", "m", "--api-key", "three", "--api-key", "four", "--api-key", "three"])
    assert serve.api_keys(args) == ("three", "four")
    monkeypatch.delenv("MLX_DSV4_API_KEY")
    assert serve.api_keys(parser.parse_args(["--model", "m"])) == ()


def test_a_key_reuses_only_prefixes_of_its_own_conversations(server):
    a = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY_A, max_retries=0, timeout=60)
    b = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY_B, max_retries=0, timeout=60)
    document = "The partition probe reads a long shared document. " * 40
    first = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": document + " hello-probe"}]
    one = a.chat.completions.create(model=MODEL, messages=first, max_tokens=8)
    assert one.choices[0].message.content == "Hello there!"
    second = first + [{"role": "assistant", "content": one.choices[0].message.content},
                      {"role": "user", "content": "and then?"}]
    guessed = b.chat.completions.create(model=MODEL, messages=second, max_tokens=2)
    assert guessed.usage.prompt_tokens_details.cached_tokens == 0
    own = a.chat.completions.create(model=MODEL, messages=second, max_tokens=2)
    assert own.usage.prompt_tokens == guessed.usage.prompt_tokens
    assert own.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens - 1
    message = anthropic.Anthropic(base_url=server.base, api_key=KEY_B, max_retries=0, timeout=60).messages.create(
        model=MODEL, max_tokens=2, system="You are terse.",
        messages=[{"role": "user", "content": document + " hello-probe"},
                  {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "and now?"}])
    assert message.usage.input_tokens > one.usage.prompt_tokens
    assert message.usage.cache_read_input_tokens == 0
    store = server.health()["prompt_cache"]
    assert 0 < store["memory_bytes"] <= store["memory_budget_bytes"]
