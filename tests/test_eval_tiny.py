"""benchmarks/eval_tiny.py runs on a checkpoint and prints its tool-use rows (the slice that runs in
seconds; each measure's own test is in test_train_evaluate.py)."""

import importlib.util
import json
from pathlib import Path

from generate_support import tiny_chat_dir


def test_eval_tiny_prints_its_tool_rows_and_writes_its_figures(tmp_path, capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "eval_tiny.py"
    spec = importlib.util.spec_from_file_location("eval_tiny", path)
    eval_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_tiny)
    out = tmp_path / "eval.json"
    eval_tiny.main(["--model", str(tiny_chat_dir()), "--tool-n", "1", "--lengths", "--loss-n", "0", "--mtp-n", "0",
                    "--cache-n", "0", "--json", str(out)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    measures = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert len(measures) == 12
    assert all(m.startswith("tool use (training cities): ") for m in measures[:6])
    assert all(m.startswith("tool use (unseen cities): ") for m in measures[6:])
    figures = json.loads(out.read_text())
    for key in ("call_tokens", "call_tokens_unseen_cities"):
        calls = figures[key]
        assert calls["n"] == 1 and calls["arguments_tokens"] > 0 and 0 <= calls["arguments"] <= 1
