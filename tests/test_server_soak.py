"""A soak of the live server: valid, invalid and abandoned requests mixed over a few client
threads; afterwards memory, threads and file descriptors are where the warm-up left them and
the server still answers."""

import json
import os
import random
import socket
import threading
import time

import httpx
import pytest

from test_server_support import KV_LIMIT, MODEL, ServerProcess

KEY = "soak-key"
WORKERS = 4
WARM_UP = 36
SOAK = 120
DEADLINE_S = 300  # for the soak phase; it takes well under a minute on an idle machine


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(["--served-model-name", MODEL, "--api-key", KEY, "--max-kv-size", KV_LIMIT,
                            "--temperature", "0", "--max-tokens", "8", "--prompt-cache-bytes", "2MiB",
                            "--prompt-cache-disk-bytes", "8MiB"])
    yield server
    server.stop()


def user(text):
    return [{"role": "user", "content": text}]


def expect(response, status):
    assert response.status_code == status, (status, response.status_code, response.text[:300])
    return response


def chat(http, i):
    expect(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user(f"soak {i}: say"), "max_tokens": 4}),
           200)


def chat_stream(http, i):
    body = {"model": MODEL, "messages": user(f"soak {i}: stream"), "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        expect(r, 200)
        assert "data: [DONE]" in "".join(r.iter_text())


def follow_up(http, i):
    first = user(f"soak {i}: a conversation about caching prompts")
    r = expect(http.post("/v1/chat/completions", json={"model": MODEL, "messages": first, "max_tokens": 3}), 200)
    reply = r.json()["choices"][0]["message"]["content"]
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "go on"}]
    expect(http.post("/v1/chat/completions", json={"model": MODEL, "messages": second, "max_tokens": 3}), 200)


def messages(http, i):
    body = {"model": MODEL, "max_tokens": 4, "messages": user(f"soak {i}: anthropic")}
    expect(http.post("/v1/messages", json=body), 200)
    with http.stream("POST", "/v1/messages", json={**body, "stream": True}) as r:
        expect(r, 200)
        assert "event: message_stop" in "".join(r.iter_text())


def completion_and_count(http, i):
    expect(http.post("/v1/completions", json={"model": MODEL, "prompt": f"soak {i}", "max_tokens": 3}), 200)
    expect(http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": user(f"soak {i}")}), 200)


def invalid(http, i):
    post = "/v1/chat/completions"
    expect(http.post(post, content=b"{not json"), 400)
    expect(http.post(post, json={"model": MODEL, "messages": user("x"), "max_tokens": "ten"}), 400)
    expect(http.post(post, content=b'{"model": "tiny-v4", "messages": [{"role": "user", "content": "\\ud800"}]}'), 400)
    expect(http.post("/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": user("word " * 400_000)}), 400)
    expect(http.post(post, content=b"{}", headers={"Content-Type": "text/plain"}), 415)
    expect(http.post(post, json={"model": MODEL, "messages": user("x")}, headers={"Authorization": "Bearer no"}), 401)
    expect(http.get("/v1/models", headers={"Host": "rebound.example"}), 421)
    expect(http.get("/v1/nowhere"), 404)


def _raw_post(server, body):
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer "
                 f"{KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def abandoned(http, i, server):
    body = {"model": MODEL, "messages": user(f"soak {i}: a long story"), "max_tokens": 300}
    with _raw_post(server, {**body, "stream": True}) as sock:  # leaves after two events
        received = b""
        while received.count(b"data: ") < 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
    with _raw_post(server, body):  # leaves while it is queued or running
        time.sleep(0.2)


KINDS = [chat, chat_stream, follow_up, messages, completion_and_count, invalid, abandoned]


def run_phase(server, count, seed):
    """``count`` requests of random kinds over WORKERS threads; returns (seconds, failures)."""
    rng = random.Random(seed)
    plan = [(i, rng.choice(KINDS)) for i in range(count)]
    failures, lock = [], threading.Lock()

    def worker(share):
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        with httpx.Client(base_url=server.base, headers=headers, timeout=120) as http:
            for i, kind in share:
                try:
                    kind(http, i, server) if kind is abandoned else kind(http, i)
                except Exception as err:  # noqa: BLE001 - collected and reported together
                    with lock:
                        failures.append(f"{kind.__name__} #{i}: {type(err).__name__}: {err}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(plan[w::WORKERS],)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, failures


def settled(server, timeout=60):
    """The server's figures once nothing is queued or running: RSS (MiB), threads, open fds."""
    deadline = time.time() + timeout
    while True:
        health = server.health()
        if health["pending"] == 0 and not health["active"] and health["request_body_bytes"] == 0:
            break
        assert time.time() < deadline, f"the server did not settle: {health}"
        time.sleep(0.1)
    time.sleep(1)  # abandoned connections finish closing
    status = {}
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    return {"rss_mib": int(status["VmRSS"][0]) / 1024, "threads": int(status["Threads"][0]),
            "fds": len(os.listdir(f"/proc/{server.proc.pid}/fd")), "health": health}


def test_mixed_traffic_leaves_no_growth_behind(server):
    seconds, failures = run_phase(server, WARM_UP, seed=1)
    assert failures == []
    warm = settled(server)
    rounds = []
    for r in range(3):
        seconds_r, failures = run_phase(server, SOAK // 3, seed=10 + r)
        assert failures == [], failures[:5]
        seconds += seconds_r
        rounds.append(settled(server))
    print(f"\nsoak: {WARM_UP} + {SOAK} requests in {seconds:.1f} s; after warm-up "
          f"{ {k: v for k, v in warm.items() if k != 'health'} }, after each round "
          f"{[{k: round(v) for k, v in r.items() if k != 'health'} for r in rounds]}")
    assert seconds < DEADLINE_S
    end = rounds[-1]
    assert end["rss_mib"] <= 1.10 * warm["rss_mib"]
    assert end["threads"] <= warm["threads"] + 2
    assert end["fds"] <= warm["fds"] + 4
    # not rising from round to round either
    assert not (rounds[0]["fds"] < rounds[1]["fds"] < rounds[2]["fds"])
    assert not (rounds[0]["threads"] < rounds[1]["threads"] < rounds[2]["threads"])
    health = end["health"]
    assert health["status"] == "ok" and health["failed"] == 0 and health["cancelled"] >= 1
    store = health["prompt_cache"]
    assert store["memory_bytes"] <= store["memory_budget_bytes"] and store["disk_bytes"] <= store["disk_budget_bytes"]
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        r = expect(http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("still there?"),
                                                           "max_tokens": 3}), 200)
        assert r.json()["usage"]["completion_tokens"] >= 1
