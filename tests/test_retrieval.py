"""The long-context retrieval suite: generated cases (size, depth, determinism), the answer checker,
and benchmarks/retrieval.py end to end on the random tiny model."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from generate_support import tiny_chat_dir
from mlx_dsv4 import retrieval_tasks as rt
from mlx_dsv4.tokenizer import load_tokenizer

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "retrieval.py"
ASSISTANT_OPENER = "<｜Assistant｜></think>"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("retrieval_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_chat_dir())


def _sentences(text):
    """Filler sentences end in a lower-case letter or a digit and a full stop (an initial does not)."""
    return re.split(r"(?<=[a-z0-9]\.) ", text)


def _haystack_bounds(case):
    """(start, end) characters of the text between the instruction and the question."""
    start = case.prompt.index("\n\n") + 2
    end = case.prompt.rindex("\n\n" + case.question)
    return start, end


# -- generated cases ------------------------------------------------------------------------------

@pytest.mark.parametrize("task", rt.TASKS)
@pytest.mark.parametrize("size", [1024, 3000, 4096])
def test_prompt_has_the_requested_token_count(tokenizer, task, size):
    for case in rt.build_cases(tokenizer, task, size, seed=3, depths=(0.0, 0.5, 1.0), cases=2):
        assert size - rt.size_tolerance(size) <= len(case.ids) <= size, (case.label, len(case.ids))
        assert case.ids == tokenizer.encode(str(case.prompt))
        assert case.prompt.startswith("<｜begin▁of▁sentence｜><｜User｜>")
        assert case.prompt.endswith(case.question + ASSISTANT_OPENER)
        assert case.answer and case.answer not in case.question


@pytest.mark.parametrize("size", [2048, 4096])
@pytest.mark.parametrize("depth", rt.DEFAULT_DEPTHS)
def test_needle_sits_at_the_requested_depth(tokenizer, size, depth):
    case = rt.needle_case(tokenizer, size, depth, seed=1)
    needle = case.meta["needle"]
    assert case.prompt.count(needle) == 1 and case.answer in needle
    start, end = _haystack_bounds(case)
    at = case.prompt.index(needle)

    def tokens(chars):
        return len(tokenizer.encode(case.prompt[start:chars]))

    longest_sentence = max(len(tokenizer.encode(" " + s)) for s in _sentences(case.prompt[start:end]))
    room = tokens(end) - len(tokenizer.encode(" " + needle))
    assert abs(tokens(at) - depth * room) <= longest_sentence, (tokens(at), depth * room, room)
    assert case.meta["needle_token"] == len(tokenizer.encode(case.prompt[:at]))


def test_haystack_sentences_are_varied_and_never_repeat(tokenizer):
    case = rt.needle_case(tokenizer, 16384, 0.5)
    start, end = _haystack_bounds(case)
    sentences = [s for s in _sentences(case.prompt[start:end]) if s != case.meta["needle"]]
    assert len(sentences) > 500 and all(s.endswith(".") for s in sentences)
    assert len(set(sentences)) == len(sentences)
    openings = {" ".join(s.split()[:2]) for s in sentences}
    assert len(openings) > 50
    assert not any("vault" in s or "access code" in s for s in sentences)


def test_multidoc_answer_needs_two_documents(tokenizer):
    for index in range(4):
        case = rt.multidoc_case(tokenizer, 4096, seed=2, index=index)
        ceo, company = case.meta["ceo"], case.meta["company"]
        documents = case.prompt.split("\n\n")
        naming_ceo = [d for d in documents if ceo in d]
        assert len(naming_ceo) == 1 + (ceo in case.question)  # the profile, and the question itself
        assert f"{ceo} is the chief executive officer of {company}." in naming_ceo[0]
        assert case.answer not in naming_ceo[0]
        records = [d for d in documents if d.startswith(f"Company record: {company}\n")]
        assert len(records) == 1 and case.answer in records[0]
        chief_of_company = [d for d in documents if f"chief executive officer of {company}." in d]
        assert chief_of_company == [naming_ceo[0]]


def test_codebase_answer_is_unambiguous(tokenizer):
    constant_case = rt.codebase_case(tokenizer, 4096, seed=5, index=0)
    name = constant_case.meta["constant"]
    assert constant_case.prompt.count(f"    {name} = ") == 1
    definition = constant_case.prompt.index(f"    {name} = ")
    enclosing = re.findall(r"^def (\w+)\(", constant_case.prompt[:definition], flags=re.MULTILINE)[-1]
    assert enclosing == constant_case.answer
    assert constant_case.prompt.count(f"def {constant_case.answer}(") == 1

    field_case = rt.codebase_case(tokenizer, 4096, seed=5, index=1)
    class_name, field = field_case.meta["class"], field_case.meta["field"]
    assert field_case.prompt.count(f"class {class_name}:") == 1
    body = field_case.prompt.split(f"class {class_name}:\n", 1)[1].split("\n\n", 1)[0]
    assert f"    {field}: int = {field_case.answer}" in body.splitlines()


@pytest.mark.parametrize("task", rt.TASKS)
def test_same_seed_gives_identical_prompts(tokenizer, task):
    first = rt.build_cases(tokenizer, task, 2048, seed=7, cases=2)
    again = rt.build_cases(tokenizer, task, 2048, seed=7, cases=2)
    other = rt.build_cases(tokenizer, task, 2048, seed=8, cases=2)
    assert [(c.prompt, c.ids, c.answer) for c in first] == [(c.prompt, c.ids, c.answer) for c in again]
    assert [c.prompt for c in first] != [c.prompt for c in other]
    assert len({c.prompt for c in first}) == len(first)


def test_size_too_small_for_a_case_is_refused(tokenizer):
    with pytest.raises(rt.RetrievalSizeError, match=r"100 tokens cannot hold this case: .* alone take \d+ tokens"):
        rt.codebase_case(tokenizer, 100)


# -- scoring -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expected, output", [
    ("493812", "493812"), ("493812", " 493812.\n"), ("493812", "**493812**"), ("493812", "`493812`"),
    ("493812", "Answer: 493812"), ("493812", "493,812"), ("493812", "\n493812\nThat is the code."),
    ("493812", '"493812"'), ("Port Aldren", "port aldren"), ("Port Aldren", "Port  Aldren!"),
    ("compute_backoff", "compute_backoff()"), ("compute_backoff", "`compute_backoff`."),
    ("1987", "(1987)"),
])
def test_checker_accepts_trivial_formatting(expected, output):
    assert rt.is_correct(output, expected)


@pytest.mark.parametrize("expected, output", [
    ("493812", "493813"), ("493812", "4938120"), ("493812", "493812 or 493813"), ("493812", ""),
    ("493812", "The code is 493812"), ("493812", "49 3812"), ("Port Aldren", "Port"),
    ("Port Aldren", "Aldren"), ("compute_backoff", "compute_backoff_v2"), ("compute_backoff", "backoff"),
    ("1987", "1978"),
])
def test_checker_rejects_wrong_answers(expected, output):
    assert not rt.is_correct(output, expected)


# -- the benchmark ---------------------------------------------------------------------------------------

QUICK = ["--cases", "1", "--depths", "0,100", "--max-new-tokens", "2", "--prefill-step", "512"]


def test_suite_runs_end_to_end_on_the_tiny_model(bench, tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = bench.main(["--model", str(tiny_chat_dir()), "--sizes", "1K,1.5K", *QUICK,
                     "--json", str(out_json), "--plot", str(out_png)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| task | 1K | 1536 |" in captured.out
    for task in rt.TASKS:
        expected_runs = 2 if task in ("needle", "keyvalue") else 1
        assert re.search(rf"^\| {task} \| \d/{expected_runs} \(\d+%\) \| \d/{expected_runs} \(\d+%\) \|$",
                         captured.out, flags=re.MULTILINE), captured.out
    # progress: two 512-token chunks and the rest for each 1K case
    assert re.search(r"\[needle 1K depth 0%\]: prefilled 512/\d+ tokens", captured.err)
    assert re.search(r"\[codebase 1536 case 1\]: prefilled (\d+)/\1 tokens", captured.err)

    results = json.loads(out_json.read_text())
    assert results["random_weights"] is True and results["sizes"] == [1024, 1536]
    assert set(results["accuracy"]) == set(rt.TASKS)
    assert results["accuracy"]["needle"]["1K"]["ran"] == 2
    cases = results["cases"]
    assert len(cases) == 2 * (2 + 1 + 1 + 2)
    for case in cases:
        assert case["size"] - rt.size_tolerance(case["size"]) <= case["prompt_tokens"] <= case["size"]
        assert isinstance(case["correct"], bool) and "output" in case and case["answer"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_a_model_the_trained_one_looks_up_keys(bench, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    rc = bench.main(["--sizes", "1K", "--depths", "0,50,100", "--max-new-tokens", "4", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    results = json.loads(out_json.read_text())
    assert results["random_weights"] is False and "meaningless" not in captured.out
    assert results["tasks"] == ["keyvalue"]
    assert results["accuracy"]["keyvalue"]["1K"]["ran"] == 3
    assert results["accuracy"]["keyvalue"]["1K"]["right"] >= 2, results["cases"]


def test_random_tiny_model_scores_are_called_meaningless(bench, tmp_path, capsys):
    args = ["--sizes", "1K", "--tasks", "needle", "--depths", "50", "--max-new-tokens", "1"]
    assert bench.main(["--model", str(tiny_chat_dir()), *args]) == 0
    out = capsys.readouterr().out
    assert "holds random weights" in out and "meaningless" in out

    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    config = json.loads((tiny_chat_dir() / "config.json").read_text())
    del config["mlx_dsv4_random_weights"]
    (unmarked / "config.json").write_text(json.dumps(config))
    (unmarked / "model.safetensors").symlink_to(tiny_chat_dir() / "model.safetensors")
    assert bench.main(["--model", str(unmarked), *args]) == 0
    assert "meaningless" not in capsys.readouterr().out


@pytest.mark.parametrize("sizes, message", [
    ("32Q", r"argument --sizes: '32Q' is not a token count: give a number with an optional K or M"),
    ("1K,,2K", r"argument --sizes: '' is not a token count"),
    ("100", r"argument --sizes: '100' is 100 tokens: at least 512 needed"),
    ("0", r"argument --sizes: '0' is 0 tokens: at least 512 needed"),
])
def test_bad_sizes_are_refused_by_the_parser(bench, capsys, sizes, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", str(tiny_chat_dir()), "--sizes", sizes])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_sizes_beyond_the_model_context_are_refused(bench, tmp_path, capsys):
    model = tmp_path / "short-context"
    model.mkdir()
    config = json.loads((tiny_chat_dir() / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (model / "config.json").write_text(json.dumps(config))
    # no weights: the sizes are refused before anything loads
    assert bench.main(["--model", str(model), "--sizes", "2K,8K,1M"]) == 2
    err = capsys.readouterr().err
    assert f"--sizes 8K (8192 tokens) is beyond the model's context: max_position_embeddings is 4096 in " \
           f"{model / 'config.json'}" in err


def test_size_at_the_model_limit_leaves_room_for_the_answer(bench, tmp_path, capsys):
    model = tmp_path / "short-context"
    shutil.copytree(tiny_chat_dir(), model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (model / "config.json").write_text(json.dumps(config))
    out_json = tmp_path / "r.json"
    assert bench.main(["--model", str(model), "--sizes", "1K", "--tasks", "needle", "--depths", "50",
                       "--max-new-tokens", "8", "--json", str(out_json)]) == 0
    (case,) = json.loads(out_json.read_text())["cases"]
    assert 1016 - rt.size_tolerance(1016) <= case["prompt_tokens"] <= 1016


def test_kv_limit_is_reported_not_raised(bench, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    rc = bench.main(["--model", str(tiny_chat_dir()), "--sizes", "1K", *QUICK, "--max-kv-size", "4K",
                     "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 1
    assert re.search(r"\[needle 1K\] --max-kv-size: the KV cache for \d+ prompt \+ 2 new tokens needs about",
                     captured.out)
    assert "| needle | not run (1 failed) |" in captured.out
    results = json.loads(out_json.read_text())
    assert all("over the limit of 4.0 KiB" in c["error"] for c in results["cases"])


def test_out_of_memory_is_reported_and_larger_sizes_skipped(bench, monkeypatch, capsys):
    import mlx_dsv4.generate

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[metal::malloc] Attempting to allocate 99999999999 bytes which is greater than "
                           "the maximum allowed buffer size")

    monkeypatch.setattr(mlx_dsv4.generate, "generate", out_of_memory)
    rc = bench.main(["--model", str(tiny_chat_dir()), "--sizes", "1K,2K", *QUICK])
    out = capsys.readouterr().out
    assert rc == 1
    assert "[needle 1K depth 0%] out of memory: [metal::malloc] Attempting to allocate" in out
    assert "[multidoc 1K] skipped: ran out of memory at 1K" in out
    assert "[needle 2K] skipped: ran out of memory at 1K" in out
    assert "| needle | not run (1 failed) | not run (1 failed) |" in out


def test_random_weights_marker_is_written_by_the_tiny_writer(tmp_path):
    from mlx_dsv4.tiny import has_random_weights

    assert has_random_weights(json.loads((tiny_chat_dir() / "config.json").read_text()))
    assert not has_random_weights({"model_type": "deepseek_v4"})


@pytest.mark.parametrize("depth", (0.0, 0.5, 1.0))
def test_keyvalue_case_is_the_trained_models_lookup_at_the_requested_depth(tokenizer, depth):
    case = rt.keyvalue_case(tokenizer, 2048, depth, seed=4, index=1)
    content = case.prompt.split("<｜User｜>", 1)[1].rsplit(ASSISTANT_OPENER, 1)[0]
    head, *lines, question = content.split("\n")
    assert head == "Here is a list of keys and values." and question == case.question
    key = re.fullmatch(r"What is the value of key (\d+)\?", question).group(1)
    pairs = [re.fullmatch(r"(\d+): (\d{3})", line).groups() for line in lines]
    keys = [k for k, _ in pairs]
    assert len(set(keys)) == len(keys) and keys.count(key) == 1
    at = keys.index(key)
    assert dict(pairs)[key] == case.answer
    assert abs(at / (len(lines) - 1) - depth) <= 2 / len(lines)
