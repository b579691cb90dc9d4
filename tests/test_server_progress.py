"""Long prompts: /health shows the prefill's progress, and streaming requests get SSE comment
lines while they wait for their first token, which the official clients skip."""

import asyncio
import json

import httpx
import pytest

from mlx_dsv4.sampling import SamplingParams
from mlx_dsv4.server import app as app_module
from mlx_dsv4.server.app import Context, create_app
from mlx_dsv4.server.engine import Engine
from test_server_support import MODEL, checkpoint_dir

LONG = "the heron waits in the reeds " * 120  # several hundred tokens: many 16-token prefill chunks
_asked = []


def long_prompt():
    """LONG after a prefix no earlier request had: nothing of it is in the prompt cache."""
    _asked.append(None)
    return f"Question {len(_asked)}: {LONG}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    script = tmp_path_factory.mktemp("script") / "script.json"
    script.write_text(json.dumps([{"match": "", "completion": "Hello there"}]))
    engine = Engine(checkpoint_dir(), prefill_step=16, script_path=str(script))
    engine.start()
    ctx = Context(engine, MODEL, SamplingParams(max_tokens=8), max_context=engine.model.args.max_position_embeddings)
    loop = asyncio.new_event_loop()
    app = create_app(ctx)
    yield engine, app, loop
    loop.close()
    engine.stop()


def client(app, cls, http_module):
    """An official SDK client talking to the app in-process (each SDK with the httpx it is built on)."""
    http = http_module.AsyncClient(transport=http_module.ASGITransport(app=app), timeout=60)
    return cls(base_url="http://127.0.0.1:8080" + ("/v1" if cls.__module__.startswith("openai") else ""),
               api_key="none", http_client=http, max_retries=0)


def test_health_reports_prefill_progress(server):
    engine, app, loop = server
    seen = []

    async def run():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=60)
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": long_prompt()}]}
        request = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
        while not request.done():
            health = (await http.get("/health")).json()
            if health["prefill"] is not None:
                seen.append(health["prefill"])
            await asyncio.sleep(0.005)
        assert (await request).status_code == 200
        assert (await http.get("/health")).json()["prefill"] is None  # done: nothing prefilling
        await http.aclose()

    loop.run_until_complete(run())
    progress = [p for p in seen if p["total"] is not None]
    assert progress, seen
    last = progress[-1]
    assert 0 < last["done"] <= last["total"] < last["prompt_tokens"] and last["total"] > 16 * 4
    assert last["tok_s"] > 0 and last["elapsed_s"] > 0
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)


def _raw_stream(app, loop, path, body):
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=60) as http:
            return (await http.post(path, json=body)).text

    return loop.run_until_complete(run())


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_streams_send_comments_while_prefilling(server, monkeypatch, path):
    engine, app, loop = server

    def body():
        return {"model": MODEL, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": long_prompt()}]}

    monkeypatch.setattr(app_module, "SSE_KEEPALIVE_S", 0.002)
    text = _raw_stream(app, loop, path, body())
    comments = [line for line in text.splitlines() if line.startswith(":")]
    assert any(line.startswith(": prefill ") and " tokens" in line for line in comments), comments[:5]
    assert text.rstrip().splitlines()[-1].startswith("data:")  # the stream still ends with its events
    # without the wait, no comment at all
    monkeypatch.setattr(app_module, "SSE_KEEPALIVE_S", 600)
    assert not [line for line in _raw_stream(app, loop, path, body()).splitlines() if line.startswith(":")]


def test_official_clients_parse_streams_with_comments(server, monkeypatch):
    openai = pytest.importorskip("openai")
    anthropic = pytest.importorskip("anthropic")
    engine, app, loop = server
    monkeypatch.setattr(app_module, "SSE_KEEPALIVE_S", 0.002)

    async def run():
        oa = client(app, openai.AsyncOpenAI, httpx)
        stream = await oa.chat.completions.create(model=MODEL, max_tokens=4, stream=True,
                                                  messages=[{"role": "user", "content": long_prompt()}])
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        an = client(app, anthropic.AsyncAnthropic, pytest.importorskip("httpx2"))
        async with an.messages.stream(model=MODEL, max_tokens=4,
                                      messages=[{"role": "user", "content": long_prompt()}]) as s:
            message = await s.get_final_message()
        return text, message

    text, message = loop.run_until_complete(run())
    assert text == "Hello there"
    assert "".join(b.text for b in message.content if b.type == "text") == "Hello there"
    assert message.stop_reason == "end_turn"
