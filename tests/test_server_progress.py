"""Long prompts through the server: prefill progress in /health, SSE keep-alive comments while
a streaming reply has nothing to send, and the official clients still read those streams."""

import threading
import time

import httpx
import pytest

from test_server_support import API_KEY, MODEL, ServerProcess, anthropic_client, openai_client

LONG = "Every word of this long document must be read before the answer. " * 300


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(["--served-model-name", MODEL, "--api-key", API_KEY, "--temperature", "0",
                            "--prefill-step", "32", "--sse-keepalive", "0.05", "--prompt-cache-dir", "none"])
    yield server
    server.stop()


def watch_health(server, stop, seen):
    while not stop.is_set():
        prefill = server.health().get("prefill")
        if prefill:
            seen.append(prefill)
        time.sleep(0.01)


def test_prefill_progress_and_keepalive_comments(server):
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_health, args=(server, stop, seen))
    watcher.start()
    lines = []
    try:
        body = {"model": MODEL, "max_tokens": 3, "stream": True,
                "messages": [{"role": "user", "content": LONG + " first"}]}
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            lines = list(r.iter_lines())
    finally:
        stop.set()
        watcher.join()
    keepalives = [i for i, line in enumerate(lines) if line.startswith(": keep-alive")]
    content = [i for i, line in enumerate(lines) if '"content"' in line and '"role"' not in line]
    assert keepalives and content and keepalives[0] < content[0], lines[:8]
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    moving = [p for p in seen if 0 < p["tokens_done"] < p["tokens_total"]]
    assert moving, seen[:5]
    assert all(p["tokens_per_s"] > 0 and p["eta_s"] is not None for p in moving)
    assert server.health()["prefill"] is None  # nothing prefills now


def test_official_clients_read_streams_with_keepalive_comments(server):
    chunks = list(openai_client(server).chat.completions.create(
        model=MODEL, max_tokens=4, stream=True, messages=[{"role": "user", "content": LONG + " second"}]))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    with anthropic_client(server).messages.stream(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": LONG + " third"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens >= 1 and final.usage.input_tokens > 1000


def test_a_client_that_leaves_during_prefill_stops_it_between_chunks(server):
    before = server.health()["cancelled"]
    body = {"model": MODEL, "max_tokens": 3, "stream": True,
            "messages": [{"role": "user", "content": LONG * 6 + " leaving"}]}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        for line in r.iter_lines():
            prefill = server.health()["prefill"] if line.startswith(": keep-alive") else None
            if prefill and prefill["eta_s"] and prefill["tokens_done"] > 0:
                break  # the prefill is running, with most of it still to do: leave
    left = time.perf_counter()
    while server.health()["cancelled"] == before:
        time.sleep(0.05)
    stopped_after = time.perf_counter() - left
    health = server.health()
    assert health["prefill"] is None and health["active"] is False
    # it stopped at the next chunk, long before the rest of the prompt would have been prefilled
    assert stopped_after < prefill["eta_s"] / 2, (stopped_after, prefill)
