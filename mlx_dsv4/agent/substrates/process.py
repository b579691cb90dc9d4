"""``process``: a child process with resource limits, a scrubbed environment and a
private working directory."""

import json
import os
import pwd
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

from .base import (
    RUNNER,
    Substrate,
    function_spec,
    interpret_command,
    interpret_function,
    run_child,
)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Limits:
    """Per-execution limits. ``max_processes`` is how many processes and threads the
    tool may add to those its user already runs (RLIMIT_NPROC is per user)."""

    timeout: float = 10.0
    cpu_seconds: Optional[int] = None  # defaults to the timeout, rounded up
    memory_bytes: Optional[int] = 1 << 30
    file_size_bytes: Optional[int] = 64 << 20
    max_processes: Optional[int] = 64
    output_bytes: int = 64 << 10

    def for_runner(self):
        cpu = self.cpu_seconds if self.cpu_seconds is not None else max(1, int(self.timeout + 0.999))
        return {
            "cpu_seconds": cpu,
            "memory_bytes": self.memory_bytes,
            "file_size_bytes": self.file_size_bytes,
            "max_processes": self.max_processes,
        }


def unprivileged_user(user):
    """(uid, gid) to drop to: ``user`` (name or uid), or nobody when running as root.

    RLIMIT_NPROC is not enforced for root, so the limits only hold for another user.
    """
    if user is None:
        if os.geteuid() != 0:
            return None
        user = "nobody"
    if user is False:
        return None
    entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


class ProcessSubstrate(Substrate):
    """Runs each tool in a fresh child process.

    Limits: wall-clock ``timeout`` (the process group is killed), RLIMIT_CPU,
    RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, stdout/stderr capped at ``output_bytes``.
    The environment holds only PATH, HOME, TMPDIR, LANG and the names in ``env``; the
    working directory is private (mode 0700, removed by ``close``) unless ``workdir`` is
    given. Python function tools must be module-level so a fresh interpreter can import
    them. As root, tools run as ``user`` (default nobody) after their module is imported,
so later imports need an interpreter that user can read. A tool that detaches into a
    new session escapes the kill at the timeout; use ``sandbox`` for untrusted code.

    A tool that keeps the agent's user (not root, or ``user=False``) runs in a user
    namespace of its own on Linux, so it cannot read the agent's or any other process's
    ``/proc/<pid>/environ``, ``fd`` or ``mem``; setuid programs do not gain privileges
    there. Where user namespaces are not permitted (macOS, some containers and
    distributions) it runs without one, and any process of the same user, the agent
    included, is readable to it through ``/proc`` (on macOS, ``ps -E``).
    Files, network and other processes' command lines are not hidden by this substrate.
    """

    name = "process"

    def __init__(self, limits=None, *, workdir=None, env=None, user=None, **limit_overrides):
        self.limits = limits or Limits()
        if limit_overrides:
            self.limits = Limits(**{**asdict(self.limits), **limit_overrides})
        self.extra_env = dict(env or {})
        self.drop = unprivileged_user(user)
        self._own_workdir = workdir is None
        self._workdir = None if workdir is None else os.path.abspath(workdir)

    @property
    def workdir(self):
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="mlx-dsv4-tool-")
            os.chmod(self._workdir, 0o700)
            if self.drop:
                os.chown(self._workdir, *self.drop)
        return self._workdir

    def environment(self):
        env = {
            "PATH": SAFE_PATH,
            "HOME": self.workdir,
            "TMPDIR": self.workdir,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONIOENCODING": "utf-8",
        }
        env.update(self.extra_env)
        return env

    def _spec(self, spec):
        spec["limits"] = self.limits.for_runner()
        spec["workdir"] = self.workdir
        spec["drop"] = {"uid": self.drop[0], "gid": self.drop[1]} if self.drop else None
        # Without a change of user, only another user namespace keeps /proc/<agent> closed.
        spec["user_namespace"] = self.own_user_namespace()
        return (json.dumps(spec) + "\n").encode()

    def own_user_namespace(self):
        return self.drop is None

    def wrap(self, argv, *, function_paths=()):
        """The command line that starts the runner; the sandbox wraps it."""
        return argv

    def tool_imports(self, spec):
        """Paths to make visible for importing the tool of ``spec``; a substrate with a
        private filesystem view also narrows ``spec["sys_path"]`` to them. Here the tool
        sees the whole filesystem and keeps the caller's import path."""
        return []

    def _python(self, isolated_site):
        # -I: no PYTHONPATH, user site or cwd on sys.path; -S as well for commands.
        return [sys.executable, "-I"] + ([] if isolated_site else ["-S"]) + [RUNNER]

    def run_command(self, argv):
        if isinstance(argv, str) or not argv:
            raise ValueError("a command is a non-empty list of strings")
        argv = [str(a) for a in argv]
        outcome = run_child(
            self.wrap(self._python(False)),
            stdin_data=self._spec({"mode": "command", "argv": argv}),
            cwd=self.workdir,
            env=self.environment(),
            timeout=self.limits.timeout,
            output_bytes=self.limits.output_bytes,
            on_timeout=self.on_timeout,
        )
        return interpret_command(*self.unwrap(outcome), timeout=self.limits.timeout)

    def unwrap(self, outcome):
        """The outcome as the tool saw it (a wrapper may report signals as exit codes)."""
        return outcome

    def run_function(self, function, arguments):
        spec = function_spec(function, arguments)
        paths = self.tool_imports(spec)
        outcome = run_child(
            self.wrap(self._python(True), function_paths=paths),
            stdin_data=self._spec(spec),
            cwd=self.workdir,
            env=self.environment(),
            timeout=self.limits.timeout,
            output_bytes=self.limits.output_bytes,
            on_timeout=self.on_timeout,
        )
        return interpret_function(*self.unwrap(outcome), timeout=self.limits.timeout)

    def on_timeout(self):
        pass

    def close(self):
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
