"""What every substrate returns, and the shared child-process plumbing."""

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

RUNNER = str(Path(__file__).with_name("_runner.py"))
RESULT_MARK = "\x00mlx-dsv4-result\x00"


class SubstrateUnavailable(RuntimeError):
    """The isolation a substrate promises cannot be provided on this machine."""


@dataclass
class ExecutionResult:
    """Outcome of one tool execution.

    ``status``: "ok", "error" (the tool raised or exited non-zero), "timeout" (killed at
    the wall-clock limit), "killed" (ended by a signal, e.g. a CPU or file-size limit),
    "output_limit" (killed for producing more than the output cap) or "invalid"
    (arguments rejected before execution).
    """

    status: str
    value: object = None
    output: str = ""
    error: Optional[str] = None
    exit_code: Optional[int] = None
    signal: Optional[str] = None
    duration_s: float = 0.0
    truncated: bool = False
    substrate: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self):
        return self.status == "ok"

    def to_content(self, max_chars=16000):
        """The text given back to the model as the tool message."""
        if self.ok and self.value is not None:
            body = self.value if isinstance(self.value, str) else json.dumps(self.value, ensure_ascii=False, default=repr)
            if self.output.strip():
                body += "\n[output]\n" + self.output
        elif self.ok:
            body = self.output
        else:
            body = f"error ({self.status}): {self.error or 'failed'}"
            if self.output.strip():
                body += "\n[output]\n" + self.output
        if self.truncated:
            body += "\n[output truncated]"
        if len(body) > max_chars:
            body = body[:max_chars] + "\n[truncated]"
        return body

    def to_dict(self):
        return {
            "status": self.status,
            "value": self.value,
            "output": self.output,
            "error": self.error,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "duration_s": round(self.duration_s, 6),
            "truncated": self.truncated,
            "substrate": self.substrate,
        }


class Substrate:
    """Where a tool runs. ``run(tool, arguments)`` never raises for a tool failure."""

    name = "substrate"

    def run(self, tool, arguments):
        start = time.perf_counter()
        try:
            if tool.command is not None:
                result = self.run_command(tool.command(arguments))
            else:
                result = self.run_function(tool.function, arguments)
        except SubstrateUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - a broken tool must not end the agent
            result = ExecutionResult("error", error=f"{type(err).__name__}: {err}")
        result.substrate = self.name
        if not result.duration_s:
            result.duration_s = time.perf_counter() - start
        return result

    def run_function(self, function, arguments):
        raise NotImplementedError

    def run_command(self, argv):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(argv, *, stdin_data=b"", cwd=None, env=None, timeout, output_bytes, on_timeout=None):
    """Run ``argv`` in its own session; kill the whole process group at ``timeout``
    seconds, when stdout or stderr exceeds ``output_bytes``, and once the child exits
    (so nothing it started in the background lives on).

    Returns (exit code or None, signal name or None, stdout bytes, stderr bytes,
    status among "exited", "timeout", "output_limit", truncated, duration).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
    )
    try:
        proc.stdin.write(stdin_data)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ)
    status, truncated = "exited", False
    deadline = start + timeout
    exited_at = None
    try:
        while selector.get_map():
            now = time.perf_counter()
            if now >= deadline:
                status = "timeout"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            # Background children may keep the pipes open after the child exits.
            if exited_at is not None and now - exited_at > 0.2:
                break
            for key, _ in selector.select(timeout=min(0.05, deadline - now)):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                room = output_bytes - len(buffer)
                buffer += chunk[: max(room, 0)]
                if len(chunk) > room:
                    truncated = True
            if truncated:
                status = "output_limit"
                break
    finally:
        selector.close()
        if status == "timeout" and on_timeout is not None:
            on_timeout()
        kill_group(proc.pid)
        proc.wait()
        for stream in buffers:
            stream.close()
    code = proc.returncode
    exit_code, sig = (code, None) if code >= 0 else (None, _signal_name(-code))
    return exit_code, sig, bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), status, truncated, time.perf_counter() - start


_LIMIT_SIGNALS = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}


def decode(data):
    return data.decode("utf-8", errors="replace")


def interpret_command(exit_code, sig, stdout, stderr, status, truncated, duration, *, timeout):
    """ExecutionResult of a command: stdout and stderr together are its output."""
    output = decode(stdout)
    if stderr:
        output += ("\n" if output and not output.endswith("\n") else "") + "[stderr]\n" + decode(stderr)
    if status == "timeout":
        return ExecutionResult("timeout", output=output, error=f"killed after the {timeout:g} s time limit",
                               signal="SIGKILL", duration_s=duration, truncated=truncated)
    if status == "output_limit":
        return ExecutionResult("output_limit", output=output, error="killed for exceeding the output limit",
                               exit_code=exit_code, signal=sig, duration_s=duration, truncated=True)
    if sig is not None:
        return ExecutionResult("killed", output=output, error=f"ended by {sig}{_LIMIT_SIGNALS.get(sig, '')}",
                               signal=sig, duration_s=duration, truncated=truncated)
    if exit_code != 0:
        return ExecutionResult("error", output=output, error=f"exit code {exit_code}", exit_code=exit_code,
                               duration_s=duration, truncated=truncated)
    return ExecutionResult("ok", output=output, exit_code=0, duration_s=duration, truncated=truncated)


def interpret_function(exit_code, sig, stdout, stderr, status, truncated, duration, *, timeout):
    """ExecutionResult of a function run by the runner (its result is on stdout)."""
    output = decode(stderr)
    text = decode(stdout)
    payload = None
    if RESULT_MARK in text:
        try:
            payload = json.loads(text.rsplit(RESULT_MARK, 1)[1])
        except ValueError:
            payload = None
    if status == "timeout":
        return ExecutionResult("timeout", output=output, error=f"killed after the {timeout:g} s time limit",
                               signal="SIGKILL", duration_s=duration, truncated=truncated)
    if status == "output_limit":
        return ExecutionResult("output_limit", output=output, error="killed for exceeding the output limit",
                               duration_s=duration, truncated=True)
    if payload is not None:
        if payload.get("ok"):
            return ExecutionResult("ok", value=payload.get("value"), output=output, exit_code=exit_code,
                                   duration_s=duration, truncated=truncated)
        return ExecutionResult("error", error=payload.get("error"), output=output, exit_code=exit_code,
                               signal=sig, duration_s=duration, truncated=truncated)
    if sig is not None:
        return ExecutionResult("killed", output=output, error=f"ended by {sig}{_LIMIT_SIGNALS.get(sig, '')}",
                               signal=sig, duration_s=duration, truncated=truncated)
    return ExecutionResult("error", output=output, error=f"the tool process exited with code {exit_code} without a result",
                           exit_code=exit_code, duration_s=duration, truncated=truncated)


def function_spec(function, arguments):
    """What the runner needs to import ``function`` in a fresh interpreter."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", "")
    if module is None or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"{qualname or function!r} must be a module-level function to run outside this process"
        )
    source = getattr(sys.modules.get(module), "__file__", None)
    return {
        "mode": "function",
        "module": module,
        "file": source,
        "qualname": qualname,
        "arguments": arguments,
        "sys_path": [p for p in sys.path if p and os.path.isdir(p)],
    }


def tool_source(spec):
    """What a fresh interpreter must read to import the tool of ``spec`` (from
    ``function_spec``), and the ``sys.path`` entries that lead there: the directories of
    its top-level package, or its module file alone. Nothing else of the folder it sits
    in, which may be the caller's home or project folder."""
    module = sys.modules.get(spec["module"])
    name = spec["module"]
    if name == "__main__":
        # ``python -m package.script`` keeps the real name in the module's spec.
        name = getattr(getattr(module, "__spec__", None), "name", None) or name
    top = sys.modules.get(name.split(".")[0]) if name != "__main__" else None
    package_dirs = [os.path.abspath(p) for p in getattr(top, "__path__", None) or []]
    if package_dirs:
        return package_dirs, sorted({os.path.dirname(p) for p in package_dirs})
    if spec["file"]:
        source = os.path.abspath(spec["file"])
        return [source], [os.path.dirname(source)]
    return [], []


def python_executable():
    return sys.executable
