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

from distributed_worker import forward_logits
from generate_support import tiny_chat_dir

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
LAUNCH = "from mlx._distributed_utils.launch import main; main()"
PROMPT = [5, 17, 300, 42, 7, 99, 100, 101, 200, 201, 3, 4, 9, 11, 13, 500, 6, 8, 10, 12]
CHUNK, DECODE = 8, 3
TOLERANCE = 1e-5


def free_port(n=1) -> int:
    """The first of ``n`` consecutive ports that are free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        try:
            held = []
            for p in range(base, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free ports")


def launch(n, out_dir, spec, timeout=150):
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(n), "-p", str(free_port(n)), "--",
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


def runs(tiny_dirs, specs):
    return [{"name": f"{preset}-{mode}-{split}", "checkpoint": str(tiny_dirs[preset]), "mode": mode,
             "split": split} for preset, mode, split in specs]


def check_logits(tiny_dirs, results, run_specs):
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
def two_ranks(tiny_dirs, tmp_path_factory):
    specs = runs(tiny_dirs, [(p, m, None) for p in ("flash", "pro") for m in ("pipeline", "experts")])
    chat = str(tiny_chat_dir())
    spec = {"runs": specs, "prompt": PROMPT, "chunk": CHUNK, "decode": DECODE,
            "generate": [{"checkpoint": chat, "mode": m, "max_tokens": 8, "temperature": t, "seed": 3}
                         for m in ("pipeline", "experts") for t in (0.0, 0.8)]}
    return specs, spec, launch(2, tmp_path_factory.mktemp("two"), spec)


def test_two_ranks_give_the_single_process_logits(tiny_dirs, two_ranks):
    specs, _, results = two_ranks
    assert [r["size"] for r in results] == [2, 2]
    check_logits(tiny_dirs, results, specs)


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
    check_logits(tiny_dirs, results, specs)


# -- faults -------------------------------------------------------------------------------


def start_ranks(tmp_path, spec, ranks, n, timeout_s):
    """Start ``ranks`` of an ``n``-rank ring directly (as mlx.launch would), so that one can be
    killed without the launcher stopping the others."""
    port = free_port(n)
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
