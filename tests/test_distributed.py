"""Pipeline and expert parallel inference on 2 and 3 local ranks (`mlx.launch --backend ring`),
against the single-process model; a rank that dies or stops answering ends the run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import PARITY_VOCAB
from mlx_dsv4.distributed import free_ports
from distributed_worker import forward_logits
from generate_support import tiny_chat_dir

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
LAUNCH = "from mlx._distributed_utils.launch import main; main()"
PROMPT = [5, 17, 300, 42, 7, 99, 100, 101, 200, 201, 3, 4, 9, 11, 13, 500, 6, 8, 10, 12]
CHUNK, DECODE = 8, 3
TOLERANCE = 1e-5


def launch(n, out_dir, spec, timeout=150):
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(n), "-p", str(free_ports(n)), "--",
           sys.executable, WORKER, str(out_dir), json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    results = []
    for r in range(n):
        f = out_dir / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no result\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        results.append(json.loads(f.read_text()))
    return results


def single_process_logits(checkpoint):
    from mlx_dsv4.loader import load_model

    return forward_logits(load_model(checkpoint, check_memory=False), PROMPT, CHUNK, DECODE)


def runs(checkpoints, specs):
    return [{"name": f"{preset}-{mode}-{split}", "checkpoint": str(checkpoints[preset]), "mode": mode,
             "split": split} for preset, mode, split in specs]


def check_logits(results, run_specs):
    for run in run_specs:
        reference = single_process_logits(run["checkpoint"])
        for result in results:
            got = result["runs"][run["name"]]["logits"]
            assert len(got) == len(reference) == -(-len(PROMPT) // CHUNK) + DECODE
            for step, (want, have) in enumerate(zip(reference, got)):
                want, have = np.array(want), np.array(have)
                assert want.shape == have.shape
                diff = float(np.abs(want - have).max())
                assert diff <= TOLERANCE, f"{run['name']} rank {result['rank']} step {step}: max diff {diff}"


@pytest.fixture(scope="module")
def checkpoints(tiny_dirs, tmp_path_factory):
    """The tiny float checkpoints (official layout), Flash converted to the MLX layout with 4-bit
    experts (stacked per projection: each rank reads its rows of them), and a Flash whose head is
    tied to its embedding."""
    from mlx_dsv4.convert.convert import convert
    from mlx_dsv4.convert.recipes import Recipe
    from mlx_dsv4.tiny import write_tiny_checkpoint

    q4 = tmp_path_factory.mktemp("q4") / "flash-q4"
    convert(tiny_dirs["flash"], q4, Recipe("q4", group_size=32, dtype="float32"), progress=False,
            log=lambda s: None)
    tied = write_tiny_checkpoint(tmp_path_factory.mktemp("tied") / "flash-tied", seed=6, vocab_size=PARITY_VOCAB,
                                 tie_word_embeddings=True)
    return dict(tiny_dirs, **{"flash-q4": q4, "flash-tied": tied})


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory):
    specs = runs(checkpoints, [(p, m, None) for p in ("flash", "pro", "flash-q4", "flash-tied")
                                 for m in ("pipeline", "experts")])
    chat = str(tiny_chat_dir())
    spec = {"runs": specs, "prompt": PROMPT, "chunk": CHUNK, "decode": DECODE,
            "generate": [{"checkpoint": chat, "mode": m, "max_tokens": 8, "temperature": t, "seed": 3}
                         for m in ("pipeline", "experts") for t in (0.0, 0.8)]}
    return specs, spec, launch(2, tmp_path_factory.mktemp("two"), spec)


def test_two_ranks_give_the_single_process_logits(two_ranks):
    specs, _, results = two_ranks
    assert [r["size"] for r in results] == [2, 2]
    check_logits(results, specs)


def test_each_rank_holds_only_its_part(two_ranks):
    _, _, (first, last) = two_ranks
    for preset in ("flash", "flash-q4"):
        pipe = [r["runs"][f"{preset}-pipeline-None"] for r in (first, last)]
        assert pipe[0]["layers"][0] == 0 and pipe[0]["layers"][1] == pipe[1]["layers"][0] and pipe[1]["layers"][1] == 6
        for part, other in ((pipe[0], pipe[1]), (pipe[1], pipe[0])):
            layers = {int(k.split(".")[1]) for k in part["held"] if k.startswith("layers.")}
            assert layers == set(range(*part["layers"]))
        assert "embed.weight" in pipe[0]["held"] and not any(k.startswith("head.") for k in pipe[0]["held"])
        assert "head.weight" in pipe[1]["held"] and "embed.weight" not in pipe[1]["held"]
        for result in (first, last):
            held = result["runs"][f"{preset}-experts-None"]["held"]
            assert held["layers.3.ffn.experts.w1.weight"][0] == 4  # 8 experts over 2 ranks
            assert held["layers.3.ffn.gate.weight"][0] == 8
    # a tied head reads the embedding: the last rank holds it too, and no rank holds a head
    tied = [r["runs"]["flash-tied-pipeline-None"]["held"] for r in (first, last)]
    assert all("embed.weight" in held and not any(k.startswith("head.") for k in held) for held in tied)


def test_two_ranks_generate_the_single_process_tokens(two_ranks):
    from mlx_dsv4 import load
    from mlx_dsv4.generate import generate

    _, spec, results = two_ranks
    model, tokenizer = load(tiny_chat_dir())
    for i, g in enumerate(spec["generate"]):
        want = generate(model, tokenizer, PROMPT, max_tokens=g["max_tokens"], temperature=g["temperature"],
                        seed=g["seed"], prefill_step=CHUNK).tokens
        assert len(want) == g["max_tokens"]
        for result in results:
            assert result["generate"][i] == want, (g, result["rank"])


def test_three_ranks_uneven_splits(tiny_dirs, tmp_path):
    specs = runs(tiny_dirs, [("flash", "pipeline", None), ("pro", "pipeline", "1,3,2"),
                             ("flash", "experts", None), ("pro", "experts", None)])
    results = launch(3, tmp_path, {"runs": specs, "prompt": PROMPT, "chunk": CHUNK, "decode": DECODE})
    assert [r["runs"]["pro-pipeline-1,3,2"]["layers"] for r in results] == [[0, 1], [1, 4], [4, 6]]
    flash = [r["runs"]["flash-pipeline-None"]["layers"] for r in results]
    assert flash[0][0] == 0 and flash[-1][1] == 6 and all(a[1] == b[0] for a, b in zip(flash, flash[1:]))
    check_logits(results, specs)


# -- faults -------------------------------------------------------------------------------


def start_ranks(tmp_path, spec, ranks, n, timeout_s):
    """Start ``ranks`` of an ``n``-rank ring directly (as mlx.launch would), so that one can be
    killed without the launcher stopping the others."""
    port = free_ports(n)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
    procs = {}
    for r in ranks:
        env = dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile), MLX_DSV4_DIST_TIMEOUT=str(timeout_s))
        procs[r] = subprocess.Popen([sys.executable, WORKER, str(tmp_path), json.dumps(spec)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return procs


def finish(proc, limit):
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the rank did not exit within {limit} s\n{err}")
    return proc.returncode, err, time.monotonic() - start


@pytest.mark.parametrize("mode", ["pipeline", "experts"])
def test_a_killed_rank_ends_the_run_with_an_error_naming_it(tiny_dirs, tmp_path, mode):
    spec = {"prompt": PROMPT, "die": {"checkpoint": str(tiny_dirs["flash"]), "mode": mode, "rank": 1,
                                      "step": 3, "signal": "SIGKILL"}}
    procs = start_ranks(tmp_path, spec, [0, 1], 2, timeout_s=60)
    code, err, _ = finish(procs[0], 60)
    procs[1].wait(timeout=30)
    assert procs[1].returncode == -signal.SIGKILL
    assert code != 0
    assert "DistributedError: rank 0: lost the connection to rank 1 while" in err, err


def test_a_rank_that_stops_answering_ends_the_run_after_the_timeout(tiny_dirs, tmp_path):
    spec = {"prompt": PROMPT, "die": {"checkpoint": str(tiny_dirs["flash"]), "mode": "pipeline", "rank": 1,
                                      "step": 3, "signal": "SIGSTOP"}}
    procs = start_ranks(tmp_path, spec, [0, 1], 2, timeout_s=3)
    try:
        while not (tmp_path / "ready0").exists() and procs[0].poll() is None:
            time.sleep(0.1)
        code, err, seconds = finish(procs[0], 60)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert code == 75, err
    assert "error: rank 0: rank 1 did not answer within 3 s while" in err, err
    assert seconds < 30


def test_a_rank_that_never_connects_ends_the_start_after_the_timeout(tiny_dirs, tmp_path):
    spec = {"prompt": PROMPT}
    procs = start_ranks(tmp_path, spec, [0], 2, timeout_s=3)
    code, err, seconds = finish(procs[0], 60)
    assert code != 0
    assert "error: rank 0: rank(s) 1 (127.0.0.1:" in err and "did not connect within 3 s at start" in err, err
    assert seconds < 30


# -- splitting and reading (one process) ------------------------------------------------------


def test_layers_split_by_bytes_with_the_embedding_on_the_first_rank_and_the_head_on_the_last():
    from mlx_dsv4.sharding import split_layers

    assert split_layers([10, 10, 10, 10], 2) == [2, 2]
    assert split_layers([10, 10, 10, 10], 2, first_extra=20) == [1, 3]
    assert split_layers([10, 10, 10, 10], 2, last_extra=20) == [3, 1]
    assert split_layers([5, 5, 30, 5, 5], 3) == [2, 1, 2]
    assert split_layers([1, 1, 1], 3) == [1, 1, 1]


def test_a_tied_head_puts_the_embedding_on_the_last_rank_too():
    from mlx_dsv4.sharding import pipeline_extras, split_layers

    assert pipeline_extras(40, 3, tied=False) == (40, 3)
    assert pipeline_extras(40, 3, tied=True) == (40, 43)
    assert split_layers([10] * 8, 2, *pipeline_extras(40, 3, tied=True)) == [4, 4]
    assert split_layers([10] * 8, 2, *pipeline_extras(40, 3, tied=False)) == [2, 6]


def test_a_split_that_does_not_fit_is_refused():
    from mlx_dsv4.sharding import DistributedError, parse_split, split_layers

    with pytest.raises(DistributedError, match="cannot split 2 layers over 3 ranks"):
        split_layers([1, 1], 3)
    with pytest.raises(DistributedError, match=r"pipeline split '2,2': needs 2 positive layer counts summing to 6"):
        parse_split("2,2", 6, 2)
    with pytest.raises(DistributedError, match="expected layer counts separated by commas"):
        parse_split("2;4", 6, 2)


def test_rows_of_a_stacked_tensor_are_read_alone_and_a_truncated_file_is_named(tmp_path):
    import mlx.core as mx

    from mlx_dsv4.distributed import DistributedError, read_rows

    f = tmp_path / "experts.safetensors"
    w = mx.arange(4 * 3 * 2, dtype=mx.float32).reshape(4, 3, 2)
    b = (mx.arange(4 * 5).reshape(4, 5) / 7).astype(mx.bfloat16)
    mx.save_safetensors(str(f), {"w": w, "b": b})
    assert mx.array_equal(read_rows(f, "w", 1, 3), w[1:3])
    got = read_rows(f, "b", 2, 4)
    assert got.dtype == mx.bfloat16 and mx.array_equal(got, b[2:4])
    with pytest.raises(DistributedError, match="no tensor x"):
        read_rows(f, "x", 0, 1)
    single = tmp_path / "one.safetensors"
    mx.save_safetensors(str(single), {"w": w})
    data = single.read_bytes()
    single.write_bytes(data[:-8])  # the last expert loses its last 2 values
    with pytest.raises(DistributedError, match=rf"one.safetensors: tensor w is truncated at byte offset {len(data) - 8}"):
        read_rows(single, "w", 2, 4)
    assert mx.array_equal(read_rows(single, "w", 0, 3), w[:3])


# -- the command line ---------------------------------------------------------------------


def cli_json(argv, ranks=None, timeout=120):
    cmd = [sys.executable, "-m", "mlx_dsv4.cli", *argv]
    if ranks:
        cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(ranks), "-p", str(free_ports(ranks)),
               "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"not one JSON document on stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


@pytest.mark.parametrize("mode,sampling", [("pipeline", ["--temp", "0.8", "--seed", "5"]), ("experts", [])])
def test_generate_on_two_ranks_prints_the_single_process_reply_once(mode, sampling):
    argv = ["generate", "--model", str(tiny_chat_dir()), "--prompt", "Name a bird.", "--max-tokens", "8",
            "--json", *sampling]
    want = cli_json(argv)
    got = cli_json([*argv, "--distributed", mode], ranks=2)
    assert got["distributed"] == {"mode": mode, "ranks": 2}
    assert want["usage"]["completion_tokens"] == 8
    for key in ("content", "reasoning_content", "finish_reason"):
        assert got[key] == want[key]
    for key in ("prompt_tokens", "completion_tokens"):
        assert got["usage"][key] == want["usage"][key]


@pytest.mark.parametrize("flags,problem", [
    (["--pipeline-split", "1,2"], "--pipeline-split needs --distributed pipeline"),
    (["--distributed", "experts", "--pipeline-split", "1,2"], "--pipeline-split needs --distributed pipeline"),
    (["--distributed", "pipeline", "--draft", "mtp", "--temp", "0"], "--draft does not run with --distributed"),
    (["--distributed", "pipeline", "--prompt-cache", "x.safetensors"],
     "--prompt-cache does not run with --distributed"),
])
def test_generate_refuses_flags_that_do_not_run_distributed(capsys, flags, problem):
    from mlx_dsv4.cli import main

    code = main(["generate", "--model", str(tiny_chat_dir()), "--prompt", "hi", *flags])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {problem}"


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_chat_and_serve_refuse_a_draft_with_distributed(capsys, command):
    from mlx_dsv4.cli import main

    code = main([command, "--model", str(tiny_chat_dir()), "--distributed", "pipeline", "--draft", "mtp"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("error: --draft does not run with --distributed")


# -- convert --estimate-only --ranks --------------------------------------------------------


def test_estimate_per_rank_splits_the_release_between_ranks(capsys):
    import re

    from mlx_dsv4.cli import main

    assert main(["convert", "--estimate-only", "--preset", "flash", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    model_gb = float(re.search(r"output size: ([\d.]+) GB model", out)[1])
    pipeline = re.search(r"  pipeline: (.*)", out)[1]
    experts = re.search(r"  experts: (.*)", out)[1]
    pipe_ranks = re.findall(r"rank (\d) \(layers (\d+)-(\d+)\): ([\d.]+) GB \(weights ([\d.]+)\)", pipeline)
    assert [int(r[0]) for r in pipe_ranks] == [0, 1]
    assert int(pipe_ranks[0][1]) == 0 and int(pipe_ranks[1][1]) == int(pipe_ranks[0][2]) + 1
    assert int(pipe_ranks[1][2]) == 42  # V4-Flash's 43 layers
    assert abs(sum(float(r[4]) for r in pipe_ranks) - model_gb) <= 0.15  # every weight on exactly one rank
    assert all(float(r[3]) > float(r[4]) for r in pipe_ranks)  # the cache and runtime come on top
    exp_ranks = re.findall(r"rank (\d) \(experts (\d+)-(\d+)\): ([\d.]+) GB \(weights ([\d.]+)\)", experts)
    assert [(r[1], r[2]) for r in exp_ranks] == [("0", "127"), ("128", "255")]
    # each rank: everything but the routed experts, plus half of them
    assert model_gb / 2 < float(exp_ranks[0][4]) < model_gb * 0.6


def test_estimate_refuses_more_ranks_than_layers_and_ranks_without_estimate(capsys):
    from mlx_dsv4.cli import main

    assert main(["convert", "--estimate-only", "--preset", "flash", "--ranks", "44"]) == 2
    assert "error: --ranks 44: cannot split 43 layers over 44 ranks" in capsys.readouterr().err
    assert main(["convert", "--hf-path", "x", "--mlx-path", "y", "--ranks", "2"]) == 2
    assert "error: --ranks needs --estimate-only" in capsys.readouterr().err


def wait_healthy(base, proc, log, timeout=120):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"the server did not start:\n{log.read_text()}")


def rank_pid(launcher_pid, rank):
    """The pid of the rank ``rank`` process that the launcher ``launcher_pid`` started."""
    children = [c for task in Path(f"/proc/{launcher_pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    for child in children:
        if f"MLX_RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no rank {rank} among {children}")


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def serve(tmp_path, name, ranks=None):
    port = free_ports()
    cmd = [sys.executable, "-m", "mlx_dsv4.cli", "serve", "--model", str(tiny_chat_dir()), "--port", str(port),
           "--log-level", "warning"]
    if ranks:
        cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(ranks), "-p", str(free_ports(ranks)),
               "--", *cmd, "--distributed", "pipeline"]
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc, log)
    return proc, base, log


def test_serve_on_two_ranks_answers_as_one_process_and_stops_cleanly(tmp_path):
    import httpx

    body = {"model": tiny_chat_dir().name, "messages": [{"role": "user", "content": "Name a bird."}],
            "max_tokens": 8, "temperature": 0}
    single, base, _ = serve(tmp_path, "single")
    try:
        want = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
    finally:
        single.terminate()
        single.wait(timeout=30)
    launcher, base, log = serve(tmp_path, "ranks", ranks=2)
    try:
        first = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
        # a client that leaves mid-stream: every rank must end that generation at the same token
        with httpx.stream("POST", base + "/v1/chat/completions", json=dict(body, max_tokens=200, stream=True),
                          timeout=60) as stream:
            for i, _ in enumerate(stream.iter_lines()):
                if i == 4:
                    break
        again = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
        # a grammar mask on rank 0 alone would make the ranks sample apart: refused, and the ranks go on
        refused = httpx.post(base + "/v1/chat/completions", json=dict(body, response_format={"type": "json_object"}),
                             timeout=60)
        assert refused.status_code == 400 and "distributed" in refused.json()["error"]["message"]
        after = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
        assert httpx.get(base + "/health", timeout=10).json()["batch"]["max"] == 1  # the ranks replay one at a time
        os.kill(rank_pid(launcher.pid, 0), signal.SIGINT)  # Ctrl-C reaches rank 0
        code = launcher.wait(timeout=60)
    finally:
        kill_group(launcher)  # every rank, also when the test failed before they stopped
    output = log.read_text()
    assert want["usage"]["completion_tokens"] == 8
    for reply in (first, again, after):
        assert reply["choices"][0]["message"] == want["choices"][0]["message"]
        assert reply["usage"]["completion_tokens"] == 8
    assert code == 0
    assert "exited with code" not in output and "was killed" not in output, output


def chat_command(ranks=None, extra=()):
    cmd = [sys.executable, "-m", "mlx_dsv4.cli", "chat", "--model", str(tiny_chat_dir()), "--temp", "0",
           "--prompt-cache-dir", "none", *extra]
    if ranks:
        cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(ranks), "-p", str(free_ports(ranks)),
               "--", *cmd, "--distributed", "pipeline"]
    return cmd


def replies(transcript):
    """The reply lines of a chat transcript (after each prompt), without the figures."""
    return [line.split(">>> ", 1)[1] for line in transcript.splitlines()
            if line.startswith(">>> ") and not line.endswith(">>> ")]


def test_chat_on_two_ranks_replies_as_one_process_and_ctrl_c_stops_all(tmp_path):
    turns = "Hello there\nAnd again\n/save x\n/quit\n"
    # in tmp_path: the single process saves its session to ./x
    single = subprocess.run(chat_command(extra=["--max-tokens", "6"]), input=turns, capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    pair = subprocess.run(chat_command(2, ["--max-tokens", "6"]), input=turns, capture_output=True,
                          text=True, timeout=180, cwd=tmp_path)
    assert single.returncode == pair.returncode == 0, pair.stderr
    want, got = replies(single.stdout), replies(pair.stdout)
    assert got[:2] == want[:2] and len(want[0]) > 3  # the same two replies, printed once
    assert "/save needs the prompt cache" in pair.stdout

    # Ctrl-C on rank 0 in the middle of a long reply ends it on every rank; the session goes on
    log = tmp_path / "chat.log"
    launcher = subprocess.Popen(chat_command(2, ["--max-tokens", "100000"]), stdin=subprocess.PIPE,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        launcher.stdin.write("Tell me a long story\n")
        launcher.stdin.flush()
        deadline = time.time() + 120
        while len(log.read_text().split(">>> ")[-1]) < 20:  # the reply is streaming
            assert time.time() < deadline and launcher.poll() is None, log.read_text()
            time.sleep(0.2)
        os.kill(rank_pid(launcher.pid, 0), signal.SIGINT)
        while "interrupted" not in log.read_text():
            assert time.time() < deadline and launcher.poll() is None, log.read_text()
            time.sleep(0.2)
        launcher.stdin.write("/think\n/quit\n")
        launcher.stdin.flush()
        assert launcher.wait(timeout=120) == 0, log.read_text()  # every rank ends cleanly
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)  # the ranks too, not only the launcher
    assert "[thinking mode: think]" in log.read_text()
