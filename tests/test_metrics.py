"""Monitoring figures: expert routing counts, FLOPs and active parameters from the config, KV
cache by layer type, GET /metrics, `mlx-dsv4 top`, chat's /stats and `generate --stats`."""

import http.server
import io
import json
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from generate_support import default_sigint, tiny_chat_dir
from mlx_dsv4 import load
from mlx_dsv4.cli import build_parser, main
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.generate import stream_generate
from mlx_dsv4.metrics import RoutingCounter, active_parameters, flops_per_token, kv_cache_by_type
from mlx_dsv4.tiny import tiny_config
from test_server_support import ServerProcess, free_port

httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture(scope="module")
def fresh_model():
    """A model of its own: the tests attach routing counters to it."""
    return load(tiny_chat_dir())


class GateSpy(nn.Module):
    """Hands every call on to the gate and keeps the inputs it saw."""

    def __init__(self, gate):
        super().__init__()
        self.inner = gate
        object.__setattr__(self, "inputs", [])

    def __call__(self, x, tokens):
        self.inputs.append((np.array(x.astype(mx.float32)), np.array(tokens)))
        return self.inner(x, tokens)


def direct_counts(gate, inputs, k):
    """Tokens per expert, from the gate's own weights and the inputs it was given."""
    weight = np.array(gate.weight.astype(mx.float32))
    counts = np.zeros(weight.shape[0], dtype=np.int64)
    for x, tokens in inputs:
        if "tid2eid" in gate:
            chosen = np.array(gate.tid2eid)[tokens.reshape(-1)]
        else:
            logits = x.reshape(-1, x.shape[-1]) @ weight.T
            scores = np.sqrt(np.logaddexp(logits, 0.0))
            chosen = np.argsort(-(scores + np.array(gate.bias)), axis=-1, kind="stable")[:, :k]
        counts += np.bincount(chosen.reshape(-1), minlength=len(counts))
    return counts


def test_expert_counts_equal_a_direct_count_of_the_router_choices(fresh_model):
    model, tokenizer = fresh_model
    args = model.args
    spies = {}
    for i in (0, 2):  # a hash-routed layer and a learned one
        spies[i] = GateSpy(model.layers[i].ffn.gate)
        model.layers[i].ffn.gate = spies[i]
    counter = RoutingCounter.attach(model)
    try:
        ids = [int(t) for t in np.random.default_rng(0).integers(2, 5000, size=150)]
        steps = list(stream_generate(model, tokenizer, ids, max_tokens=6, prefill_step=64))
        counter.fold(keep_latest=False)
        counts = counter.counts()
    finally:
        RoutingCounter.detach(model)
        for i, spy in spies.items():
            model.layers[i].ffn.gate = spy.inner
    fed = len(ids) + steps[-1].generation_tokens - 1  # the last sampled token is not run
    assert counts.sum(axis=1).tolist() == [fed * args.num_experts_per_tok] * args.num_hidden_layers
    for i, spy in spies.items():
        expected = direct_counts(spy.inner, spy.inputs, args.num_experts_per_tok)
        assert counts[i].tolist() == expected.tolist(), f"layer {i}"
    assert not model.layers[1].ffn.routing_counter  # detached: the layers call nothing


def test_routing_counter_folds_finished_passes_only():
    counter = RoutingCounter(n_layers=1, n_experts=4)
    counter(0, mx.array([[1, 2]]))
    counter(0, mx.array([[2, 3]]))  # a second call of the same layer: the same pass, split in parts
    assert counter.counts().sum() == 0
    counter.fold(keep_latest=True)  # the pass may still be running: kept
    assert counter.counts().sum() == 0
    counter.fold(keep_latest=False)
    assert counter.counts().tolist() == [[0, 1, 2, 1]]
    counter(0, mx.array([[0, 0]]))  # after a fold, a new pass begins
    counter.discard_pending()
    counter(0, mx.array([[3, 3]]))
    counter(5, mx.array([[3, 3]]))  # a layer beyond the decoder's (an MTP layer) is not counted
    counter.fold(keep_latest=False)
    assert counter.counts().tolist() == [[0, 1, 2, 3]]


def hand_flops(cfg, context):
    """2 x multiply-adds of one token seeing ``context`` tokens, written out from the config."""
    D, H, hd, q, o, G = (cfg[k] for k in ("hidden_size", "num_attention_heads", "head_dim", "q_lora_rank",
                                           "o_lora_rank", "o_groups"))
    hc, I, E, k, W = (cfg[k] for k in ("hc_mult", "moe_intermediate_size", "n_routed_experts",
                                       "num_experts_per_tok", "sliding_window"))
    ih, ihd, topk = cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]
    mix = (2 + hc) * hc
    window = min(context, W)
    common = (D * q + q * H * hd + D * hd + H * hd * o + G * o * D  # attention projections
              + 2 * mix * hc * D  # two mHC mixes
              + D * E + k * 3 * D * I + cfg["n_shared_experts"] * 3 * D * I)  # router, routed and shared experts
    per_ratio = {
        0: common + 2 * H * hd * window,
        # compressor of 2 * hd (overlapping windows), indexer (queries, head weights, its own
        # compressor of 2 * ihd, scores over every closed entry), then window + top-k entries
        4: (common + 2 * D * 2 * hd + q * ih * ihd + D * ih + 2 * D * 2 * ihd + ih * ihd * (context // 4)
            + 2 * H * hd * (window + min(topk, context // 4))),
        128: common + 2 * D * hd + 2 * H * hd * (window + context // 128),
    }
    head = hc * hc * D + D * cfg["vocab_size"]
    return 2 * (sum(per_ratio[r] for r in cfg["compress_ratios"]) + head)


@pytest.mark.parametrize("preset", ["flash", "pro"])
@pytest.mark.parametrize("context", [1, 5, 130, 1000, 70000])
def test_flops_per_token_matches_the_formula(preset, context):
    cfg = tiny_config(preset)
    assert flops_per_token(ModelArgs.from_dict(cfg), context) == hand_flops(cfg, context)


def test_flops_grow_with_the_entries_attended():
    args = ModelArgs.from_dict(tiny_config("pro"))
    # past the window, only new compressed entries (and indexer scores) add work
    assert flops_per_token(args, 128) < flops_per_token(args, 4 * 128) < flops_per_token(args, 128 * 128)


def test_active_parameters_count_the_chosen_experts(fresh_model):
    model, _ = fresh_model
    args = model.args
    expected = 0
    for name, value in tree_flatten(model.parameters()):
        if re.search(r"\.ffn\.experts\.w[123]\.weight$", name):
            expected += value.size * args.num_experts_per_tok // args.n_routed_experts
        elif name == "embed.weight" or name.endswith("tid2eid"):
            expected += value.shape[1]
        else:
            expected += value.size
    assert active_parameters(args) == expected


def test_a_tied_head_reads_the_whole_embedding():
    untied = ModelArgs.from_dict(tiny_config("flash"))
    tied = ModelArgs.from_dict(tiny_config("flash", tie_word_embeddings=True))
    assert active_parameters(tied) == active_parameters(untied)  # head.weight stored or not, it is read
    assert flops_per_token(tied, 300) == flops_per_token(untied, 300)
    from mlx_dsv4.bench import decode_weight_bytes
    from mlx_dsv4.model import Model

    read = [decode_weight_bytes(Model(args)) for args in (untied, tied)]
    head = untied.vocab_size * untied.hidden_size * 4
    assert read[1]["decode_weight_bytes"] == read[0]["decode_weight_bytes"]
    assert read[1]["total_weight_bytes"] == read[0]["total_weight_bytes"] - head


@pytest.mark.parametrize("n_tokens", [3, 130, 700])
def test_kv_cache_by_layer_type_equals_the_cache(fresh_model, n_tokens):
    model, _ = fresh_model
    cache = model.make_cache()
    tokens = mx.array([[(7 * i) % 4000 + 2 for i in range(n_tokens)]], dtype=mx.int32)
    model(tokens, cache=cache)
    mx.eval(cache.state())
    figures = kv_cache_by_type(model.args, n_tokens, *model.cache_dtypes, model.dtype)
    kinds = {0: "window", 4: "csa", 128: "hca"}
    for ratio, kind in kinds.items():
        layers = [layer for layer in cache.layers if layer.ratio == ratio]
        assert figures[kind]["layers"] == len(layers)
        assert figures[kind]["bytes"] == sum(layer.nbytes for layer in layers)
        entries = sum(layer.compressor.n_entries for layer in layers if layer.compressor is not None)
        assert figures[kind]["compressed_entries"] == entries
        assert figures[kind]["window_rows"] == min(n_tokens, model.args.sliding_window) * len(layers)


# -- the server ------------------------------------------------------------------------

API_KEY = "metrics-test-key"


@pytest.fixture(scope="module")
def server():
    root = Path(tempfile.mkdtemp(prefix="dsv4-metrics-test-"))
    process = ServerProcess(["--served-model-name", "tiny", "--api-key", API_KEY], model=tiny_chat_dir(), root=root)
    try:
        yield process.base
    finally:
        process.stop()
        process.log.close()
        shutil.rmtree(root, ignore_errors=True)


def scrape(base):
    response = httpx.get(base + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in parser.text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = sample.name + json.dumps(sample.labels, sort_keys=True) if sample.labels else sample.name
            samples[key] = sample.value
    return samples


def test_metrics_parse_and_move_after_a_request(server):
    before = scrape(server)
    for name in ("mlx_dsv4_info", "mlx_dsv4_queue_depth", "mlx_dsv4_active_parameters", "mlx_dsv4_flops_per_token",
                 "mlx_dsv4_prompt_cache_hits_total", "mlx_dsv4_generated_tokens_total"):
        assert any(key.startswith(name) for key in before), name
    reply = httpx.post(server + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "Count the birds."}],
                             "max_tokens": 6, "temperature": 0})
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    after = scrape(server)
    completed = 'mlx_dsv4_requests_total{"outcome": "completed"}'
    assert after[completed] == before[completed] + 1
    assert after["mlx_dsv4_generated_tokens_total"] == before["mlx_dsv4_generated_tokens_total"] + 6
    assert after["mlx_dsv4_prompt_tokens_total"] == before["mlx_dsv4_prompt_tokens_total"] + usage["prompt_tokens"]
    assert after["mlx_dsv4_prompt_cache_misses_total"] == before["mlx_dsv4_prompt_cache_misses_total"] + 1
    assert after["mlx_dsv4_decode_tokens_per_second"] > 0
    # the server keeps the whole reply in its prompt cache, so every token went through the layers
    fed = usage["prompt_tokens"] + usage["completion_tokens"]
    for layer in range(3):
        routed = sum(v for k, v in after.items() if k.startswith("mlx_dsv4_expert_tokens_total")
                     and f'"layer": "{layer}"' in k)
        previous = sum(v for k, v in before.items() if k.startswith("mlx_dsv4_expert_tokens_total")
                       and f'"layer": "{layer}"' in k)
        assert routed - previous == 2 * fed
    tokens = usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert after["mlx_dsv4_context_tokens"] == tokens
    args = ModelArgs.from_path(tiny_chat_dir())
    kv = kv_cache_by_type(args, tokens, "fp8", "fp4", "float32")
    assert after['mlx_dsv4_kv_cache_bytes{"layer_type": "csa"}'] == kv["csa"]["bytes"]
    assert after['mlx_dsv4_kv_cache_compressed_entries{"layer_type": "csa"}'] == tokens // 4
    assert after["mlx_dsv4_flops_per_token"] == flops_per_token(args, tokens + 1)


def test_metrics_follow_the_access_rules_of_health(server):
    assert httpx.get(server + "/metrics").status_code == 200  # no key needed, as for /health
    refused = httpx.get(server + "/metrics", headers={"Host": "evil.example"})
    assert refused.status_code == 421
    assert httpx.get(server + "/health", headers={"Host": "evil.example"}).status_code == 421


def test_top_once_prints_the_figures(server, capsys):
    samples = scrape(server)
    assert main(["top", server, "--once"]) == 0
    out = capsys.readouterr().out
    assert "mlx-dsv4 tiny" in out
    completed = int(samples['mlx_dsv4_requests_total{"outcome": "completed"}'])
    assert f"requests: {completed} completed" in out
    assert f"active parameters {int(samples['mlx_dsv4_active_parameters']):,}" in out
    for title in ("window-only", "CSA (ratio 4)", "HCA (ratio 128)", "prompt cache:"):
        assert title in out
    if completed:
        assert "Expert routing" in out


def test_top_refreshes_until_interrupted(server):
    pexpect = pytest.importorskip("pexpect")
    completed = int(scrape(server)['mlx_dsv4_requests_total{"outcome": "completed"}'])
    child = pexpect.spawn(sys.executable, ["-m", "mlx_dsv4.cli", "top", server, "--interval", "0.3"],
                          encoding="utf-8", preexec_fn=default_sigint, timeout=60, dimensions=(50, 120))
    try:
        child.expect(f"requests: {completed} completed")
        reply = httpx.post(server + "/v1/completions", timeout=120, headers={"x-api-key": API_KEY},
                           json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3})
        assert reply.status_code == 200, reply.text
        child.expect(f"requests: {completed + 1} completed")
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_top_checks_the_interval(capsys):
    assert main(["top", "127.0.0.1:1", "--interval", "0"]) == 2
    assert "error: --interval must be a positive number of seconds, got 0" in capsys.readouterr().err


def test_top_says_when_the_url_does_not_answer(capsys):
    port = free_port()
    assert main(["top", f"127.0.0.1:{port}", "--once"]) == 1
    err = capsys.readouterr().err
    assert f"error: http://127.0.0.1:{port}/metrics does not answer" in err


@pytest.mark.parametrize("status, body", [(200, b"# just some page\nvisitors 3\n"), (404, b"no such page")])
def test_top_says_when_the_server_is_not_mlx_dsv4(capsys, status, body):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        assert main(["top", f"http://127.0.0.1:{other.server_port}/", "--once"]) == 1
    finally:
        other.shutdown()
        other.server_close()
    err = capsys.readouterr().err
    assert "not an mlx-dsv4 server" in err


# -- chat and generate -------------------------------------------------------------------

def test_chat_stats_command(fresh_model):
    from mlx_dsv4.cli.chat import ChatSession

    model, tokenizer = fresh_model
    args = build_parser().parse_args([
        "chat", "--model", str(tiny_chat_dir()), "--max-tokens", "5", "--prompt-cache-dir", "none"])
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(model, tokenizer, args, out=out, err=err)
    try:
        session.command("/stats")
        assert "[no reply yet" in out.getvalue()
        session.turn("Hello there")
        turn = re.search(r"\[(\d+) new prompt tokens prefilled, (\d+) cached \| (\d+) tokens", out.getvalue())
        prompt, generated = int(turn[1]) + int(turn[2]), int(turn[3])
        out.seek(0)
        out.truncate()
        session.command("/stats")
    finally:
        RoutingCounter.detach(model)
    text = out.getvalue()
    assert f"context: {prompt + generated - 1} tokens in the KV cache" in text
    assert "KV cache CSA (ratio 4):" in text and "KV cache HCA (ratio 128):" in text
    assert re.search(r"speed: prefill [\d.]+ tok/s \| decode [\d.]+ tok/s", text)
    assert "prompt cache: 0 hits, 1 misses" in text
    # the chat keeps the whole reply in its prompt cache: every token went through the layers
    routed = re.findall(r"experts layer (\d): imbalance [\d.]+ \(max/mean\), busiest expert \d+ with \d+ of (\d+)",
                        text)
    assert routed == [(str(i), str(2 * (prompt + generated))) for i in range(3)]


def test_generate_stats(capsys):
    model_dir = str(tiny_chat_dir())
    code = main(["generate", "--model", model_dir, "--prompt", "Name a bird.", "--max-tokens", "4", "--json",
                 "--stats"])
    out, err = capsys.readouterr()
    assert code == 0
    message = json.loads(out)
    stats, usage = message["stats"], message["usage"]
    fed = usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert stats["context_tokens"] == fed
    args = ModelArgs.from_path(model_dir)
    assert stats["kv_cache"] == kv_cache_by_type(args, fed, "fp8", "fp4", "float32")
    assert stats["flops_per_token"] == flops_per_token(args, fed + 1)
    assert stats["active_parameters"] == active_parameters(args)
    assert [sum(layer["tokens"]) for layer in stats["experts"]] == [2 * fed] * 3
    for layer in stats["experts"]:
        tokens = layer["tokens"]
        assert layer["imbalance"] == pytest.approx(max(tokens) / (sum(tokens) / len(tokens)), abs=1e-4)
    assert f"context: {fed} tokens in the KV cache" in err
    assert "KV cache CSA (ratio 4):" in err and "experts layer 2: imbalance" in err

    code = main(["generate", "--model", model_dir, "--prompt", "Name a bird.", "--max-tokens", "4", "--json"])
    assert "stats" not in json.loads(capsys.readouterr().out)


def test_generate_stats_report_draft_acceptance(capsys):
    code = main(["generate", "--model", str(tiny_chat_dir()), "--prompt", "Name a bird.", "--max-tokens", "6",
                 "--draft", "mtp", "--json", "--stats"])
    out, err = capsys.readouterr()
    assert code == 0
    message = json.loads(out)
    draft = message["draft"]
    assert draft["proposed"] > 0
    assert message["stats"]["draft"] == {"proposed": draft["proposed"], "accepted": draft["accepted"],
                                         "acceptance_rate": draft["acceptance_rate"]}
    assert f"draft: {draft['accepted']} of {draft['proposed']} proposed tokens accepted" in err


def test_tool_call_latency_by_substrate():
    from mlx_dsv4.agent import Agent
    from mlx_dsv4.chat import tool_calls_to_dsml
    from mlx_dsv4.metrics import TOOL_CALLS, format_figures

    def pause(seconds: float) -> str:
        """Wait a while."""
        time.sleep(seconds)
        return "done"

    call = "\n\n" + tool_calls_to_dsml(
        [{"type": "function", "function": {"name": "pause", "arguments": json.dumps({"seconds": 0.05})}}])
    replies = iter(["Waiting." + call, "Done."])
    before = TOOL_CALLS.figures().get("function", {"calls": 0, "seconds": 0.0})
    with Agent(tools=[pause], completion_fn=lambda prompt: iter([next(replies)])) as agent:
        record = agent.run("Wait.").tool_calls[0]
    after = TOOL_CALLS.figures()["function"]
    assert after["calls"] == before["calls"] + 1
    assert after["seconds"] - before["seconds"] == pytest.approx(record.result.duration_s)
    assert 0.05 <= record.result.duration_s <= after["max_s"]
    figures = {"context_tokens": 0, "active_parameters": 0, "flops_per_token": 0, "prefill_tokens_per_s": 0.0,
               "decode_tokens_per_s": 0.0, "kv_cache": {}, "tool_calls": TOOL_CALLS.figures()}
    assert any(line.startswith(f"tool calls (function): {after['calls']}, mean ") for line in format_figures(figures))
