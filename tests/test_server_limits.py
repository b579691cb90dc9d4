"""Prompts longer than the context: tokenised in pieces that give the ids of the whole, refused
after about the work the context takes, and the server's memory bounded while several are in flight."""

import json
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_dsv4.server.prompt_tokens import CHUNK_CHARS, MAX_UNBROKEN_CHARS, PromptTokenizer, PromptTooLong, UnbrokenRun
from mlx_dsv4.tokenizer import load_tokenizer
from test_server_support import MODEL, ServerProcess

CONTEXT = 4096
JSON = {"content-type": "application/json"}

# Pieces around every kind of cut point and every kind of place that must not be cut.
PIECES = ["a", "Z", "word", " word", "  ", " ", "\t", "\n", "\n\n", "\r\n", " \n", "\u00a0", "\u2028", ".", ",", "!",
          "...", "-", ":", "<", ">", "|", "0", "7", "1234567", "½", "²", "中", "文字", "ひらがな", "カー", "、", "。",
          "é", "e\u0301", "Жук", "ß", "😀", "｜", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<dsml:",
          "</dsml:", "｜DSML｜", "<｜end▁of▁sentence｜>", "<|place_holder_mm_span_0424|>", "<｜place▁holder▁no▁10｜>"]
texts = st.lists(st.sampled_from(PIECES) | st.characters(exclude_categories=("Cs",)), min_size=1, max_size=80).map("".join)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def pieces(tokenizer):
    return PromptTokenizer(tokenizer)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=texts, chunk=st.integers(1, 40))
def test_pieces_give_the_ids_of_the_whole(tokenizer, pieces, text, chunk):
    pieces.chunk_chars = chunk
    assert pieces.bounded
    assert pieces.encode(text, 10**9) == tokenizer.encode(text)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=texts, chunk=st.integers(1, 40), offset=st.integers(-3, 3))
def test_the_limit_is_reached_exactly_when_the_whole_has_that_many_tokens(tokenizer, pieces, text, chunk, offset):
    pieces.chunk_chars = chunk
    n = len(tokenizer.encode(text))
    limit = max(1, n + offset)
    if n >= limit:
        with pytest.raises(PromptTooLong) as err:
            pieces.encode(text, limit)
        assert limit <= err.value.at_least <= n
    else:
        assert len(pieces.encode(text, limit)) == n


class CountingTokenizer:
    """The V4 tokenizer, counting the characters it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer.tokenizer
        self._inner = tokenizer
        self.chars = 0

    def encode(self, text, add_special_tokens=False):
        self.chars += len(text)
        return self._inner.encode(text, add_special_tokens=add_special_tokens)


def test_counting_stops_soon_after_the_limit(tokenizer):
    counting = CountingTokenizer(tokenizer)
    pieces = PromptTokenizer(counting)
    assert pieces.max_token_chars == 128  # the longest entry of the V4 vocabulary
    text = "word " * 2_000_000
    with pytest.raises(PromptTooLong) as err:  # 10M characters are at least 78125 tokens
        pieces.encode(text, 50_000)
    assert err.value.at_least >= 50_000 and counting.chars == 0
    with pytest.raises(PromptTooLong) as err:  # past the character bound: counted up to the limit only
        pieces.encode(text, 100_000)
    assert err.value.at_least >= 100_000
    assert counting.chars <= 100_000 * 5 + CHUNK_CHARS
    counting.chars = 0
    assert pieces.encode(text[:200_000], 100_000) == tokenizer.encode(text[:200_000])


def test_a_run_without_any_cut_point_is_refused_before_it_is_tokenised(tokenizer):
    counting = CountingTokenizer(tokenizer)
    pieces = PromptTokenizer(counting)
    text = "word " * 1000 + "a" * (MAX_UNBROKEN_CHARS + CHUNK_CHARS + 10) + " end"
    with pytest.raises(UnbrokenRun) as err:
        pieces.encode(text, 10**9)
    assert str(MAX_UNBROKEN_CHARS) in str(err.value)
    assert counting.chars <= 5000
    # places that look like cut points but fall inside an added token ('<dsml:') are passed over
    t0 = time.perf_counter()
    with pytest.raises(UnbrokenRun):
        pieces.encode("<dsml:" * 400_000, 10**9)
    assert time.perf_counter() - t0 < 10 and counting.chars <= 5000
    assert pieces.encode("<dsml:" * 1000, 10**9) == tokenizer.encode("<dsml:" * 1000)


def test_a_tokenizer_that_splits_otherwise_is_tokenised_whole(tokenizer):
    from tokenizers import Tokenizer

    config = json.loads(tokenizer.tokenizer.to_str())
    config["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    other = Tokenizer.from_str(json.dumps(config))

    class Other:
        tokenizer = other

        def encode(self, text, add_special_tokens=False):
            return other.encode(text, add_special_tokens=add_special_tokens).ids

    pieces = PromptTokenizer(Other(), chunk_chars=3)
    assert not pieces.bounded and pieces.tokens_at_least(10**9) == 0  # no bound without known cut points
    assert PromptTokenizer(tokenizer).tokens_at_least(10**9) == -(-10**9 // 128)
    text = "Hello world, 1234 <think> 中文\n\nok"
    assert pieces.encode(text, 10**6) == Other().encode(text)
    with pytest.raises(PromptTooLong):
        pieces.encode(text, len(Other().encode(text)))


# -- against a live server -----------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(["--served-model-name", MODEL, "--max-context", str(CONTEXT), "--max-tokens", "4"])
    yield server
    server.stop()


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRSS:
    """Samples a process's RSS on a thread until stopped; ``peak`` in MiB."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def chat_body(text):
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1}).encode()


def assert_too_long(response, param="messages"):
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    # the phrase litellm and LangChain classify as a context overflow
    assert f"maximum context length is {CONTEXT} tokens" in error["message"], error["message"]


def test_oversized_prompts_are_refused_quickly_with_bounded_memory(server):
    with httpx.Client(base_url=server.base, timeout=60) as http:
        assert http.post("/v1/chat/completions", content=chat_body("hello"), headers=JSON).status_code == 200
    body = chat_body(("The quick brown fox jumps over the lazy dog. " * 600_000)[:24_000_000])
    before = rss_mb(server.proc.pid)
    watch = PeakRSS(server.proc.pid)
    replies, seconds = [None] * 4, [None] * 4

    def send(i):
        t0 = time.perf_counter()
        try:
            replies[i] = httpx.post(server.base + "/v1/chat/completions", content=body, headers=JSON, timeout=60)
        except httpx.HTTPError as err:
            replies[i] = err
        seconds[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = watch.stop()
    print(f"\n4 x 24 MB prompts: {[round(s, 1) for s in seconds]} s, RSS {before:.0f} -> peak {peak:.0f} MiB")
    for reply in replies:
        assert isinstance(reply, httpx.Response), reply
        assert_too_long(reply)
    assert max(seconds) < 30
    # tokenising all of each prompt took 2.5 GB apiece; rendering it before refusing, about 150 MB
    assert peak - before < 768
    assert server.health()["request_body_bytes"] == 0


def test_a_prompt_sure_to_be_too_long_is_refused_before_it_is_rendered(server):
    text = "word " * 4_800_000  # 24M characters: at least 187500 tokens by the character bound alone
    parts = [{"type": "text", "text": text[:12_000_000]}, {"type": "text", "text": text[12_000_000:]}]
    with httpx.Client(base_url=server.base, headers=JSON, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": parts}]})
        assert_too_long(r)
        # the rendered prompt is longer, so its own bound would say 187501
        assert "resulted in at least 187500 tokens" in r.json()["error"]["message"]
        anthropic = {"model": MODEL, "max_tokens": 4, "system": text[:12_000_000],
                     "messages": [{"role": "user", "content": [{"type": "text", "text": text[12_000_000:]}]}]}
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            r = http.post(path, json=anthropic)
            assert r.status_code == 400, r.text[:300]
            assert r.json()["error"]["message"].startswith("prompt is too long: at least 187500 tokens > 4096")


def test_a_prompt_within_the_character_bound_is_counted_only_to_the_limit(server):
    text = "Some words, and more words. " * 15_000  # 420K characters: not refused by length alone
    with httpx.Client(base_url=server.base, headers=JSON, timeout=60) as http:
        t0 = time.perf_counter()
        r = http.post("/v1/chat/completions", content=chat_body(text))
        assert time.perf_counter() - t0 < 15
        assert_too_long(r)
        assert "at least" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1})
        assert_too_long(r, param="prompt")
        r = http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 400 and f"> {CONTEXT} maximum" in r.json()["error"]["message"]
        assert r.json()["error"]["message"].startswith("prompt is too long: at least ")
        r = http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and 0 < r.json()["input_tokens"] < 20


def test_large_bodies_beyond_the_budget_get_503_until_others_finish(server):
    from mlx_dsv4.server.app import BODY_BUDGET_BYTES, MAX_BODY_BYTES

    held = MAX_BODY_BYTES - (1 << 16)
    streams = []
    try:
        for _ in range(BODY_BUDGET_BYTES // MAX_BODY_BYTES):  # bodies that are sent all but their end
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n".encode())
            sock.sendall(b" " * held)
            streams.append(sock)
        deadline = time.time() + 60
        while server.health()["request_body_bytes"] < len(streams) * held:
            assert time.time() < deadline, server.health()
            time.sleep(0.1)
        large = chat_body("x " * (1 << 20))
        with httpx.Client(base_url=server.base, headers=JSON, timeout=60) as http:
            r = http.post("/v1/chat/completions", content=large)
            assert r.status_code == 503 and "retry later" in r.json()["error"]["message"], r.text[:300]
            assert http.post("/v1/chat/completions", content=chat_body("small")).status_code == 200
            for sock in streams:
                sock.close()
            streams = []
            deadline = time.time() + 30
            while server.health()["request_body_bytes"]:
                assert time.time() < deadline, server.health()
                time.sleep(0.1)
            assert_too_long(http.post("/v1/chat/completions", content=large))
    finally:
        for sock in streams:
            sock.close()
    assert server.alive()
