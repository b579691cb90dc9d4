"""``container``: command tools in a throwaway docker or podman container with no
network, a read-only root, the working directory mounted at /work, and the process
limits mapped to the runtime's own flags."""

import os
import secrets
import shutil
import subprocess
from dataclasses import asdict

from .base import Substrate, SubstrateUnavailable, interpret_command, run_child
from .process import Limits

RUNTIMES = ("docker", "podman")
_checked = {}


def find_runtime(preferred=None):
    """(name, path) of a working container runtime, or raise ``SubstrateUnavailable``."""
    names = [preferred] if preferred else list(RUNTIMES)
    problems = []
    for name in names:
        path = shutil.which(name)
        if path is None:
            problems.append(f"{name} is not installed")
            continue
        if path not in _checked:
            try:
                done = subprocess.run([path, "info"], capture_output=True, timeout=20)
                _checked[path] = None if done.returncode == 0 else done.stderr.decode(errors="replace").strip()
            except (OSError, subprocess.TimeoutExpired) as err:
                _checked[path] = str(err)
        if _checked[path] is None:
            return name, path
        problems.append(f"{name} is installed but not usable ({_checked[path][:300]})")
    raise SubstrateUnavailable("the container substrate needs docker or podman: " + "; ".join(problems))


class ContainerSubstrate(Substrate):
    """Runs command tools with ``runtime run --rm`` in ``image``.

    Python function tools are not run here (the image would need this package);
    they get an error result. The image must already be present: there is no network
    to pull it through during a tool call, and ``--pull never`` is used.
    """

    name = "container"

    def __init__(self, image="debian:stable-slim", limits=None, *, runtime=None, workdir=None, **limit_overrides):
        self.runtime, self.executable = find_runtime(runtime)
        self.image = image
        self.limits = limits or Limits()
        if limit_overrides:
            self.limits = Limits(**{**asdict(self.limits), **limit_overrides})
        self._own_workdir = workdir is None
        self._workdir = None if workdir is None else os.path.abspath(workdir)
        self._running = None

    @property
    def workdir(self):
        if self._workdir is None:
            import tempfile

            self._workdir = tempfile.mkdtemp(prefix="mlx-dsv4-tool-")
            os.chmod(self._workdir, 0o777)  # the container's user is not ours
        return self._workdir

    def container_argv(self, argv, name):
        limits = self.limits
        cpu = limits.cpu_seconds if limits.cpu_seconds is not None else max(1, int(limits.timeout + 0.999))
        command = [self.executable, "run", "--rm", "-i", "--pull", "never", "--name", name,
                   "--network", "none", "--read-only", "--cap-drop", "ALL",
                   "--security-opt", "no-new-privileges", "--user", "65534:65534",
                   "--tmpfs", "/tmp:rw,size=16m", "--ulimit", f"cpu={cpu}:{cpu}",
                   "-v", f"{self.workdir}:/work:rw", "-w", "/work", "-e", "HOME=/work"]
        if limits.memory_bytes is not None:
            command += ["--memory", str(limits.memory_bytes), "--memory-swap", str(limits.memory_bytes)]
        if limits.file_size_bytes is not None:
            command += ["--ulimit", f"fsize={limits.file_size_bytes}:{limits.file_size_bytes}"]
        if limits.max_processes is not None:
            command += ["--pids-limit", str(limits.max_processes)]
        return command + [self.image, *[str(a) for a in argv]]

    def run_command(self, argv):
        name = "mlx-dsv4-tool-" + secrets.token_hex(6)
        self._running = name

        def stop():
            # Killing the client does not stop the container.
            subprocess.run([self.executable, "kill", name], capture_output=True, timeout=30)

        try:
            outcome = run_child(self.container_argv(argv, name), timeout=self.limits.timeout,
                                output_bytes=self.limits.output_bytes, on_timeout=stop)
        finally:
            self._running = None
        return interpret_command(*outcome, timeout=self.limits.timeout)

    def run_function(self, function, arguments):
        raise ValueError("the container substrate runs command tools only; run Python tools with 'process' or 'sandbox'")

    def close(self):
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
