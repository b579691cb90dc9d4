"""A real ``mlx-dsv4 serve`` process on a tiny random checkpoint, shared by the server tests.

The tiny model's output is random, so requests whose prompt contains one of the
``SCRIPT`` keys get that scripted completion instead (the engine's test-only hook
forces those tokens through the real model, cache and sampler).
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MODEL = "tiny-v4"
API_KEY = "test-key"
KV_LIMIT = "60MB"  # cache + prefill transient of a few thousand tokens of the tiny model: the guard is reachable

TOOL_CALL = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)
TWO_CALLS = (
    "Checking both.\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="get_time">\n'
    '<｜DSML｜parameter name="zone" string="true">CET</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)
SCRIPT = [
    {"match": "weather-probe", "completion": TOOL_CALL},
    {"match": "two-calls-probe", "completion": TWO_CALLS},
    {"match": "think-tool-probe", "completion": "The user wants weather.</think>" + TOOL_CALL},
    {"match": "reasoning-probe", "completion": "Two plus two is four.</think>The answer is 4."},
    # continues the forced opening of a named call (tool_choice naming "lookup")
    {"match": "named-probe", "completion": (
        '<｜DSML｜parameter name="q" string="true">mlx</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")},
    {"match": "json-probe", "completion": '{"ok": true}'},
    {"match": "stop-probe", "completion": "alpha beta gamma"},
    {"match": "hello-probe", "completion": "Hello there!"},
    # tool-call arguments that Python's json module reads but strict JSON does not
    {"match": "nan-argument-probe", "completion": TOOL_CALL.replace(">3<", ">NaN<")},
    {"match": "overflow-argument-probe", "completion": TOOL_CALL.replace(">3<", ">1e999<")},
]

_state = {}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_dir():
    if "checkpoint" not in _state:
        from mlx_dsv4.tiny import write_tiny_checkpoint

        root = Path(tempfile.mkdtemp(prefix="dsv4-server-test-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _state["root"] = root
        _state["checkpoint"] = write_tiny_checkpoint(root / MODEL, seed=0)
        (root / "script.json").write_text(json.dumps(SCRIPT, ensure_ascii=False), encoding="utf-8")
    return _state["checkpoint"]


class ServerProcess:
    """`mlx-dsv4 serve` in its own process group on a free port, ready when constructed; ``model``:
    the checkpoint (default: the tiny one here), ``root``: the folder of its log and prompt
    caches (default: this module's)."""

    def __init__(self, extra_args=(), env=None, model=None, root=None, timeout=120):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        model = model or checkpoint_dir()
        if root is None:
            checkpoint_dir()
            root = _state["root"]
        root = Path(root)
        args = [sys.executable, "-m", "mlx_dsv4.cli", "serve", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *extra_args]
        self.log = open(root / f"server-{self.port}.log", "w+")
        # prompt caches go to the test's own folder unless a test names one
        env = {"XDG_CACHE_HOME": str(root / "cache"), **(env or {})}
        self.proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        atexit.register(self.stop)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready:\n{self.output()}")

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def health(self):
        return httpx.get(self.base + "/health", timeout=10).json()

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        """Stop the server and whatever it started (its process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def script_env():
    """The environment that turns the scripted completions (SCRIPT) on."""
    checkpoint_dir()
    return {"MLX_DSV4_SERVER_TEST_SCRIPT": str(_state["root"] / "script.json")}


def shared_server():
    """The server most tests use: scripted outputs, an API key, greedy by default, a memory guard."""
    if "server" not in _state:
        _state["server"] = ServerProcess(
            ["--served-model-name", MODEL, "--api-key", API_KEY, "--max-kv-size", KV_LIMIT,
             "--temperature", "0", "--max-tokens", "8"],
            env=script_env(),
        )
    server = _state["server"]
    assert server.alive(), server.output()
    return server


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def anthropic_client(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.base, api_key=API_KEY, max_retries=0, timeout=60)
