"""benchmarks/eval_tiny.py runs on a checkpoint and prints its tool-use rows (the slice that runs in
seconds; each measure's own test is in test_train_evaluate.py)."""

import importlib.util
import json
from pathlib import Path

from generate_support import tiny_chat_dir
from train_runs_support import fake_run


def test_eval_tiny_prints_its_tool_rows_and_writes_its_figures(tmp_path, capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "eval_tiny.py"
    spec = importlib.util.spec_from_file_location("eval_tiny", path)
    eval_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_tiny)
    out = tmp_path / "eval.json"
    eval_tiny.main(["--model", str(tiny_chat_dir()), "--tool-n", "1", "--lengths", "--loss-n", "0", "--mtp-n", "0",
                    "--cache-n", "0", "--chat-n", "3", "--json", str(out)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    measures = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert len(measures) == 13
    assert all(m.startswith("tool use (training cities): ") for m in measures[:6])
    assert all(m.startswith("tool use (unseen cities): ") for m in measures[6:12])
    assert measures[12].startswith("chat: exact reply")
    figures = json.loads(out.read_text())
    for key in ("call_tokens", "call_tokens_unseen_cities"):
        calls = figures[key]
        assert calls["n"] == 1 and calls["arguments_tokens"] > 0 and 0 <= calls["arguments"] <= 1
    assert figures["chat"]["n"] == 3 and figures["chat"]["accuracy"] == 0  # random weights


def test_the_loss_plot_joins_a_run_to_the_runs_it_started_from(tmp_path):
    path = Path(__file__).parent.parent / "benchmarks" / "eval_tiny.py"
    spec = importlib.util.spec_from_file_location("eval_tiny", path)
    eval_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_tiny)

    fake_run(tmp_path, "a", None, 5, 5, loss_of=1.0)
    fake_run(tmp_path, "bb", "a", 6, 3, loss_of=2.0)  # the next run started from its step-3 snapshot
    fake_run(tmp_path, "ccc", "bb", 4, 4, loss_of=3.0)
    records, boundaries = eval_tiny.loss_records(tmp_path / "ccc")
    assert [r["step"] for r in records] == list(range(12)) and boundaries == [5, 8]
    assert [r["main"] for r in records] == [1.0] * 5 + [2.0] * 3 + [3.0] * 4
    eval_tiny.plot_loss(tmp_path / "ccc", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
