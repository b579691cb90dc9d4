"""Smoke tests for `mlx-dsv4 bench` at toy sizes (the real figures are in docs/performance.md)."""

import importlib.util
import json

import pytest

import mlx.core as mx

from mlx_dsv4 import bench, streams
from mlx_dsv4.cli import build_parser, main
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.memory import kv_bytes

TOY = [
    "--layers", "0,4,128",
    "--hidden-size", "64", "--num-attention-heads", "2", "--head-dim", "64", "--qk-rope-head-dim", "16",
    "--q-lora-rank", "32", "--o-groups", "2", "--o-lora-rank", "16",
    "--index-n-heads", "2", "--index-head-dim", "32", "--index-topk", "8",
    "--sliding-window", "16", "--moe-intermediate-size", "32",
    "--experts", "4", "--experts-per-token", "2", "--vocab-size", "256",
    "--contexts", "64,160", "--chunk", "64", "--decode-steps", "2", "--bandwidth-mb", "8",
]

HAVE_VLM = importlib.util.find_spec("mlx_vlm") is not None


def run_bench(tmp_path, capsys, *extra):
    out = tmp_path / "bench.json"
    rc = main(["bench", *TOY, "--checkpoint-dir", str(tmp_path / "ckpt"), "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def by_key(summary):
    return {(r["impl"], r["context"]): r for r in summary["results"]}


def check_targets(summary):
    """Each target's value is recomputed from the run's own figures and its verdict from its bound;
    a target whose figures are missing has no verdict."""
    results = by_key(summary)
    ctxs = summary["contexts"]
    small, mid, large = ctxs[0], ctxs[len(ctxs) // 2], ctxs[-1]

    def tok_s(impl, ctx, kind):
        r = results.get((impl, ctx))
        return r[f"{kind}_tok_s"] if r and r["error"] is None and r["skipped"] is None else None

    ours, vlm = tok_s("ours", mid, "decode"), tok_s("mlx-vlm", mid, "decode")
    expected = {
        "decode_vs_mlx_vlm": (ours / vlm if ours and vlm else None, lambda x: x >= bench.TARGET_DECODE_VS_VLM),
        "decode_roofline": (ours / summary["roofline_tok_s"], lambda x: x >= bench.TARGET_ROOFLINE),
        "prefill_growth": (tok_s("ours", small, "prefill") / tok_s("ours", large, "prefill"),
                           lambda x: x <= bench.TARGET_PREFILL_GROWTH),
    }
    checked = 0
    for name, (value, meets) in expected.items():
        verdict = summary["targets"][name]
        if value is None:
            assert verdict["pass"] is None, name
            continue
        assert verdict["value"] == pytest.approx(value, rel=1e-9), name
        assert verdict["pass"] is meets(value), name
        checked += 1
    peak = summary["targets"]["peak_memory_vs_mlx_vlm"]
    assert (peak["pass"] is None) == (("mlx-vlm", large) not in results)
    return checked


def test_parse_contexts_and_layers():
    assert bench.parse_contexts("32k,1k,8192,1K") == [1024, 8192, 32768]
    assert bench.parse_layers("4,128") == [4, 128]
    assert bench.parse_layers("3") == [4, 128, 4]
    assert bench.parse_layers("128") == [128]
    with pytest.raises(ValueError):
        bench.parse_layers("4,64")
    with pytest.raises(ValueError):
        bench.parse_contexts("0")


def test_cli_dispatches_bench():
    from mlx_dsv4.cli import bench as bench_command

    args = build_parser().parse_args(["bench", "--contexts", "1k,2k", "--layers", "2"])
    assert args._run is bench_command.run
    assert bench.parse_contexts(args.contexts) == [1024, 2048]
    assert args.hidden_size == 4096 and args.num_attention_heads == 64 and args.head_dim == 512


def test_ours_and_naive_side_by_side(tmp_path, capsys):
    summary, text = run_bench(tmp_path, capsys, "--impls", "ours,naive")
    results = by_key(summary)
    for impl in ("ours", "naive"):
        for ctx in (64, 160):
            r = results[(impl, ctx)]
            assert r["error"] is None and r["skipped"] is None
            assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
            assert r["peak_bytes"] > 0 and r["cache_bytes"] > 0
    # our cache is exactly what memory.kv_bytes predicts for the tokens it holds (bf16 activations:
    # the float32 norm weights do not promote them)
    cfg = ModelArgs.from_path(summary["checkpoint"])
    for ctx in (64, 160):
        held = ctx + 1  # measured after the prefill and the untimed decode step
        assert results[("ours", ctx)]["cache_bytes"] == kv_bytes(cfg, held, "fp8", "fp4", dtype=mx.bfloat16)
    # the naive cache keeps every row in bf16: more bytes per token than ours
    assert results[("ours", 160)]["cache_bytes"] < results[("naive", 160)]["cache_bytes"]
    # roofline and targets are reported, with a verdict per target
    assert summary["roofline_tok_s"] > 0 and summary["weights"]["decode_weight_bytes"] > 0
    assert set(summary["targets"]) == {"decode_vs_mlx_vlm", "decode_roofline", "prefill_growth",
                                       "peak_memory_vs_mlx_vlm", "prefill_growth_longest", "transient_growth",
                                       "decode_kept"}
    for name in ("prefill_growth_longest", "transient_growth", "decode_kept"):  # no 256K run
        assert summary["targets"][name]["pass"] is None
    for r in summary["results"]:
        assert r["peak_transient_bytes"] == max(0, r["peak_bytes"] - r["cache_bytes"])
    assert check_targets(summary) == 2  # roofline and prefill growth; no mlx-vlm run: no verdict there
    assert summary["targets"]["decode_vs_mlx_vlm"]["pass"] is None
    assert "decode roofline" in text and "ours as ratios" in text
    assert "PASS" in text or "FAIL" in text
    # the checkpoint is reused on a second run
    _, text = run_bench(tmp_path, capsys, "--impls", "ours", "--contexts", "64")
    assert "reusing checkpoint" in text


def test_missing_mlx_vlm_is_reported_not_fatal(tmp_path, capsys, monkeypatch):
    class Missing:
        def __init__(self, path):
            raise ImportError("No module named 'mlx_vlm'")

    monkeypatch.setattr(bench, "VlmRunner", Missing)
    summary, text = run_bench(tmp_path, capsys, "--impls", "ours,mlx-vlm", "--contexts", "64")
    assert "mlx-vlm" in summary["skipped_impls"]
    assert "not installed" in text
    assert by_key(summary)[("ours", 64)]["decode_tok_s"] > 0


def test_cpu_streams_flag_holds_for_the_run_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(streams.os, "cpu_count", lambda: 2)
    monkeypatch.delenv(streams.STREAMS_ENV, raising=False)
    summary, _ = run_bench(tmp_path, capsys, "--impls", "ours", "--contexts", "64", "--cpu-streams", "2")
    used = 2 if mx.default_device().type == mx.DeviceType.cpu else 1
    assert summary["impls"]["ours"].endswith(f", {used} CPU stream(s)")
    assert streams.max_cpu_streams() == 1 and len(streams.parallel_streams()) == 1


def test_naive_guard_skips_with_reason(tmp_path, capsys):
    summary, text = run_bench(tmp_path, capsys, "--impls", "ours,naive", "--contexts", "64",
                              "--naive-max-gb", "0.000001")
    assert "exceeds --naive-max-gb" in by_key(summary)[("naive", 64)]["skipped"]
    summary, _ = run_bench(tmp_path, capsys, "--impls", "ours,naive", "--naive-max-context", "100")
    results = by_key(summary)
    assert results[("naive", 64)]["skipped"] is None and results[("naive", 64)]["decode_tok_s"] > 0
    assert "--naive-max-context" in results[("naive", 160)]["skipped"]
    assert check_targets(summary) == 2


def test_vlm_max_context_skips_with_reason(tmp_path, capsys, monkeypatch):
    from mlx_dsv4.loader import load_model

    class StandIn(bench.OursRunner):  # the baseline's place in the run, without mlx-vlm
        def __init__(self, path):
            super().__init__(load_model(path), "mlx-vlm", "bf16", "bf16")

    monkeypatch.setattr(bench, "VlmRunner", StandIn)
    monkeypatch.setattr(bench, "agreement", lambda *a: {"tokens": 0, "max_abs_diff": 0.0, "max_abs": 0.0,
                                                         "argmax_agree": 1.0})
    summary, _ = run_bench(tmp_path, capsys, "--impls", "ours,mlx-vlm", "--vlm-max-context", "100")
    results = by_key(summary)
    assert results[("mlx-vlm", 64)]["skipped"] is None and results[("mlx-vlm", 64)]["decode_tok_s"] > 0
    assert "--vlm-max-context 100" in results[("mlx-vlm", 160)]["skipped"]
    assert results[("ours", 160)]["decode_tok_s"] > 0


def fake_results():
    """Our figures at 1K / 8K / 32K / 256K, chosen so that each long-context target's ratio is known."""
    def result(ctx, prefill_tok_s, decode_tok_s, transient):
        return bench.Result("ours", ctx, prefill_tok_s=prefill_tok_s, decode_tok_s=decode_tok_s, decode_ms=1e3 / decode_tok_s,
                            peak_bytes=transient + 100 * ctx, peak_transient_bytes=transient, cache_bytes=100 * ctx,
                            cache_bytes_per_token=100.0, prefill_s=ctx / prefill_tok_s)
    rows = [result(1024, 100.0, 10.0, 500), result(8192, 90.0, 8.0, 550), result(32768, 70.0, 6.0, 600),
            result(262144, 30.0, 3.0, 780)]
    return {("ours", r.context): r for r in rows}


def test_long_context_figures_and_targets_from_fake_figures():
    results = fake_results()
    figures = bench.long_context_figures(results)
    assert figures["prefill_growth_longest"] == pytest.approx(100 / 30)  # per-token time 3.33x that at 1K
    assert figures["transient_growth"] == pytest.approx(780 / 600)
    assert figures["decode_kept"] == pytest.approx(3 / 8)
    assert bench.prefill_growth(results, "ours", 32768) == pytest.approx(100 / 70)
    assert bench.prefill_growth(results, "ours", 2048) != bench.prefill_growth(results, "ours", 2048)  # nan
    lines = []
    summary = {"bandwidth": {"bytes_per_s": 1e9, "sum_bytes_per_s": 1e9, "gemv_bytes_per_s": 1e9},
               "weights": {"decode_weight_bytes": 1e8, "total_weight_bytes": 2e8}, "dtype": "bfloat16"}
    verdicts = bench.report(summary, results, [1024, 8192, 32768, 262144], ["ours"], out=lines.append)
    assert verdicts["prefill_growth"]["pass"] is True  # 1.43x <= 1.5x
    assert verdicts["prefill_growth_longest"]["pass"] is False  # 3.33x > 2.5x
    assert verdicts["transient_growth"]["pass"] is False  # 1.3x > 1.2x
    assert verdicts["decode_kept"]["pass"] is False  # 0.375x < 0.5x
    text = "\n".join(lines)
    assert "[FAIL] prefill time per token at 262144 / at 1024: 3.33x (target <= 2.5x)" in text
    assert "[FAIL] peak transient at 262144 / at 32768: 1.30x (target <= 1.2x)" in text
    assert "[FAIL] decode tok/s at 262144 / at 8192: 0.38x (target >= 0.5x)" in text
    assert " 3.33x " in text  # the per-token-vs-1K column
    results[("ours", 262144)].prefill_tok_s = 50.0
    results[("ours", 262144)].peak_transient_bytes = 700
    results[("ours", 262144)].decode_tok_s = 4.0
    verdicts = bench.report(summary, results, [1024, 8192, 32768, 262144], ["ours"], out=lines.append)
    assert all(verdicts[n]["pass"] is True for n in ("prefill_growth_longest", "transient_growth", "decode_kept"))


def test_plot_writes_a_png_of_a_result_dict(tmp_path):
    pytest.importorskip("matplotlib")
    from dataclasses import asdict

    results = fake_results()
    results[("naive", 1024)] = bench.Result("naive", 1024, prefill_tok_s=50.0, decode_tok_s=5.0,
                                            peak_transient_bytes=900, cache_bytes=10**6)
    results[("naive", 8192)] = bench.Result("naive", 8192, skipped="too large")
    path = tmp_path / "bench.png"
    bench.plot({"machine": "test", "results": [asdict(r) for r in results.values()]}, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.skipif(not HAVE_VLM, reason="mlx-vlm not installed (optional extra 'bench')")
def test_mlx_vlm_baseline_runs_on_the_same_weights(tmp_path, capsys):
    summary, text = run_bench(tmp_path, capsys, "--impls", "ours,mlx-vlm", "--contexts", "160")
    r = by_key(summary)[("mlx-vlm", 160)]
    assert r["error"] is None and r["prefill_tok_s"] > 0 and r["cache_bytes"] > 0
    assert summary["agreement"]["argmax_agree"] >= 0.9
    assert check_targets(summary) == 3
    assert "mlx-vlm" in text


def test_decode_floor_reads_the_roofline_weights(tmp_path, capsys):
    """benchmarks/decode_floor.py times products over exactly the weights the roofline counts."""
    import sys
    from pathlib import Path

    from mlx.utils import tree_flatten

    from mlx_dsv4.loader import load_model

    spec = importlib.util.spec_from_file_location(
        "decode_floor", Path(__file__).parent.parent / "benchmarks" / "decode_floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    assert floor.main([*TOY, "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    text = capsys.readouterr().out
    assert "floor, weight products only:" in text
    assert "floor at     64," in text and "floor at    160," in text

    model = load_model(next((tmp_path / "ckpt").iterdir()))
    read = sum(w.nbytes for _, w in floor.weight_products(model))
    counted = bench.decode_weight_bytes(model)["decode_weight_bytes"]
    vectors = sum(p.nbytes for _, p in tree_flatten(model.parameters()) if p.ndim < 2)
    embed_row = model.embed.weight.nbytes // model.args.vocab_size
    assert counted - vectors - embed_row <= read <= counted
    keys = [k.shape[0] for _, k in floor.attention_products(model, 160)]
    a = model.args
    assert keys == [min(160, a.sliding_window) + {0: 0, 4: min(a.index_topk, 40), 128: 1}[r] for r in a.compress_ratios]


def test_decode_steps_take_turns():
    """paired_decode alternates implementations step by step, reversing the order each round."""
    calls = []

    class Fake(bench.Runner):
        def __init__(self, name):
            self.name = name

        def step(self, tokens, cache, logits=True):
            calls.append(self.name)
            return mx.zeros((1, 1, 4))

        def evaluate(self, out, cache):
            mx.eval(out)

    runners = {"a": Fake("a"), "b": Fake("b")}
    states = {n: [mx.zeros((1, 1, 4)), None] for n in runners}
    results = {n: bench.Result(n, 8) for n in runners}
    bench.paired_decode(runners, states, results, 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(r.decode_tok_s > 0 and r.decode_ms > 0 for r in results.values())


def test_speculative_bench_forces_acceptance_and_keeps_the_greedy_output(tmp_path, capsys, monkeypatch):
    from mlx_dsv4 import bench_speculative

    monkeypatch.setattr(bench_speculative, "SWITCH_STEPS", 48)  # the switch's runs: figures need not settle here
    out = tmp_path / "spec.json"
    toy = [a for a in TOY[: TOY.index("--contexts")]] + ["--chunk", "64", "--decode-steps", "12"]
    rc = main(["bench", "--speculative", *toy, "--contexts", "80", "--acceptance", "0,0.5,1", "--num-draft", "1,3",
               "--no-vlm", "--checkpoint-dir", str(tmp_path / "ckpt"), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["dtype"] == "float32"
    assert summary["prompt"] == "random" and "random token ids" in text  # random weights: random ids
    row = summary["contexts"]["80"]
    runs = {(r["forced"], r["k"], r["switch"]): r for r in row["runs"]}
    assert set(runs) == ({(f, k, False) for f in (None, 0.0, 0.5, 1.0) for k in (1, 3)}
                         | {(f, 3, True) for f in (0.0, 0.5, 1.0)})
    for r in row["runs"]:
        assert r["first_difference"] is None  # every run emitted the plain greedy tokens
        assert r["tok_s"] > 0 and r["vs_plain"] > 0
    for k in (1, 3):
        assert runs[(0.0, k, False)]["acceptance"] == 0 and runs[(1.0, k, False)]["acceptance"] == 1
        assert abs(runs[(0.5, k, False)]["acceptance"] - 0.5) <= 0.5 / k
    assert "forced 0.8" not in text and "| forced 1, k=3 |" in text
    assert any(line.startswith(("PASS", "FAIL")) and "forced 0, k=3, switch on" in line for line in text.splitlines())
    assert "| forced 0, k=3, switch |" in text


def test_speculative_bench_picks_its_checkpoint_from_the_flags():
    assert bench.shape_flags_given(build_parser().parse_args(["bench", "--speculative"])) == []
    args = build_parser().parse_args(["bench", "--speculative", "--hidden-size", "64", "--layers", "4"])
    assert bench.shape_flags_given(args) == ["--hidden-size", "--layers"]


def test_speculative_bench_measures_the_trained_drafters_own_acceptance(tmp_path, capsys, monkeypatch):
    from mlx_dsv4 import bench_speculative
    from mlx_dsv4.train import trained_checkpoint

    monkeypatch.setattr(bench_speculative, "SWITCH_STEPS", 12)
    out = tmp_path / "spec.json"
    rc = main(["bench", "--speculative", "--contexts", "256", "--decode-steps", "12", "--num-draft", "2",
               "--acceptance", "1", "--no-vlm", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["checkpoint"] == str(trained_checkpoint())
    assert summary["prompt"] == "retrieval" and "held-out key-value lookup (real text)" in text
    row = summary["contexts"]["256"]
    assert 128 < row["prompt_tokens"] <= 256 and row["reply"].startswith(row["answer"])
    own = [r for r in row["runs"] if r["forced"] is None]
    assert [r["k"] for r in own] == [2] and "| own MTP drafter, real acceptance, k=2 |" in text
    # random weights' own drafts score 0 here; the reply is two tokens, so the rest of the 12 is what
    # the model emits after it and the figure is low
    assert 0 < own[0]["acceptance"] <= 1
    for r in row["runs"]:
        assert r["first_difference"] is None  # every run emitted the plain greedy tokens


def test_forced_acceptance_follows_the_asked_share():
    from mlx_dsv4.bench_speculative import ForcedAcceptance

    continuation = list(range(100, 200))
    forced = ForcedAcceptance(continuation, prompt_len=10, acceptance=0.8, vocab=1000)
    tokens = list(range(10)) + [continuation[0]]
    accepted = proposed = 0
    while len(tokens) < 80:
        drafts = forced(tokens, [0, 0, 0])
        start = len(tokens) - 10
        a = next((i for i, t in enumerate(drafts) if t != continuation[start + i]), 3)
        assert all(t != continuation[start + i] for i, t in enumerate(drafts) if i >= a)
        accepted, proposed = accepted + a, proposed + 3
        tokens += continuation[start : start + a + 1]
    assert abs(accepted / proposed - 0.8) < 0.05


def test_batch_floor_times_the_decode_products_at_each_row_count(tmp_path, capsys):
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "batch_floor", Path(__file__).parent.parent / "benchmarks" / "batch_floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    assert floor.main([*TOY, "--checkpoint-dir", str(tmp_path / "ckpt"), "--rows", "4,2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["1", "2", "4"]
    assert "| 1 |" in "\n".join(lines) and lines[-3].endswith("| 1.00x |")
