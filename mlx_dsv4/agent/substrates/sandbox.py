"""``sandbox``: the process substrate inside an OS sandbox with no network and no
filesystem beyond the system directories (read-only), the Python installation
(read-only), the listed read-only paths and the working directory (read-write).
bubblewrap on Linux, sandbox-exec on macOS; without them it refuses to run.

Unix sockets: bubblewrap's network namespace hides abstract sockets and the host's
network, but a socket file stays connectable wherever it is mounted, read-only or not;
so nothing of the caller's folders is mounted beyond the ``read_only`` paths and the
tool's own module. sandbox-exec's ``(deny network*)`` also refuses Unix sockets."""

import os
import shutil
import signal
import site
import subprocess
import sys
from pathlib import Path

from .base import RUNNER, SubstrateUnavailable, tool_source
from .process import ProcessSubstrate

# Enough of the system to run programs; /etc is not bound whole (it may hold secrets).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = (
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
    "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/localtime", "/etc/os-release",
)
MACOS_READABLE = (
    "/usr", "/bin", "/sbin", "/System", "/Library", "/opt/homebrew", "/private/etc",
    "/private/var/db/timezone", "/dev",
)

_probes = {}


def _interpreter_paths():
    """What the runner's interpreter reads: the Python installation, the virtual
    environment's configuration and executables, the site-packages directories, and the
    runner. Not ``sys.path`` as a whole: it holds the script's folder and PYTHONPATH
    entries, and a virtual environment may sit in (or be) a project folder."""
    paths = {sys.base_prefix, sys.base_exec_prefix, RUNNER}
    if sys.executable:  # an empty name would resolve to the current directory
        paths.add(os.path.realpath(sys.executable))
        if sys.prefix != sys.base_prefix:
            paths |= {os.path.join(sys.prefix, "pyvenv.cfg"), os.path.dirname(os.path.abspath(sys.executable))}
    paths |= {p for p in sys.path
              if os.path.basename(p) in ("site-packages", "dist-packages") and p != site.USER_SITE}
    return paths


def _without_nested(paths):
    """Outermost paths first, each once, dropping paths inside another listed path."""
    ordered = sorted({os.path.abspath(p) for p in paths if p and os.path.exists(p)}, key=lambda p: (p.count("/"), p))
    kept = []
    for p in ordered:
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return kept


class SandboxSubstrate(ProcessSubstrate):
    """Process limits plus isolation; see the module docstring.

    ``read_only`` paths are visible (read-only) at the same place inside; any Unix
    socket under them stays connectable. Python function tools also see their own
    module (or the directory of their top-level package), read-only, and import only
    from there and from the installed packages: other modules beside the tool's are not
    visible unless listed in ``read_only``.
    Raises ``SubstrateUnavailable`` at construction when the isolation tool is missing
    or does not work here.
    """

    name = "sandbox"

    def __init__(self, limits=None, *, read_only=(), platform=None, **kwargs):
        super().__init__(limits, **kwargs)
        self.platform = platform or sys.platform
        self.read_only = [os.path.abspath(p) for p in read_only]
        if self.platform.startswith("linux"):
            self.tool = shutil.which("bwrap")
            if self.tool is None:
                raise SubstrateUnavailable(
                    "the sandbox substrate needs bubblewrap (bwrap), which is not installed; "
                    "install it (apt-get install bubblewrap / dnf install bubblewrap) or choose "
                    "another substrate explicitly"
                )
            self._probe(self.bwrap_argv(["/bin/true"], probe=True))
        elif self.platform == "darwin":
            self.tool = shutil.which("sandbox-exec")
            if self.tool is None:
                raise SubstrateUnavailable("the sandbox substrate needs sandbox-exec, which is not on PATH")
            self._probe([self.tool, "-p", "(version 1)(allow default)", "/usr/bin/true"])
        else:
            raise SubstrateUnavailable(f"no sandbox is available on {self.platform}")

    def own_user_namespace(self):
        return False  # bwrap gives the tool its own PID (and, unprivileged, user) namespace

    def tool_imports(self, spec):
        paths, roots = tool_source(spec)
        spec["sys_path"] = roots
        return paths

    def _probe(self, argv):
        key = tuple(argv)
        if key not in _probes:
            try:
                done = subprocess.run(argv, capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
                _probes[key] = None if done.returncode == 0 else done.stderr.decode(errors="replace").strip()
            except (OSError, subprocess.TimeoutExpired) as err:
                _probes[key] = str(err)
        if _probes[key] is not None:
            raise SubstrateUnavailable(f"{argv[0]} is installed but cannot create a sandbox here: {_probes[key]}")

    # -- Linux -----------------------------------------------------------------

    def bwrap_argv(self, inner, *, function_paths=(), probe=False):
        argv = [self.tool, "--die-with-parent", "--new-session", "--unshare-net", "--unshare-pid",
                "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if os.geteuid() != 0:
            argv.append("--unshare-user")
        elif self.drop:
            # The runner needs these to switch to the unprivileged user; setuid clears them.
            argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        for directory in SYSTEM_DIRS:
            if os.path.islink(directory):
                argv += ["--symlink", os.readlink(directory), directory]
            elif os.path.isdir(directory):
                argv += ["--ro-bind", directory, directory]
        argv += ["--perms", "0755", "--dir", "/etc"]
        for entry in ETC_FILES:
            argv += ["--ro-bind-try", entry, entry]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        if probe:
            return argv + ["--remount-ro", "/", "--", *inner]
        readable = _without_nested([*_interpreter_paths(), *function_paths, *self.read_only])
        made = {"/", "/etc", "/proc", "/dev", *SYSTEM_DIRS}
        # bwrap makes missing parents 0700, which the unprivileged user could not cross.
        for target in [*readable, self.workdir]:
            for parent in reversed(Path(target).parents):
                parent = str(parent)
                if parent not in made:
                    made.add(parent)
                    argv += ["--perms", "0755", "--dir", parent]
        for path in readable:
            argv += ["--ro-bind", path, path]
        argv += ["--bind", self.workdir, self.workdir, "--remount-ro", "/", "--chdir", self.workdir, "--", *inner]
        return argv

    # -- macOS -----------------------------------------------------------------

    def seatbelt_profile(self, function_paths=()):
        def quoted(path):
            return '"' + os.path.realpath(path).replace("\\", "\\\\").replace('"', '\\"') + '"'

        readable = [*MACOS_READABLE, *_interpreter_paths(), *function_paths, *self.read_only, self.workdir]
        read_rules = " ".join(f"(subpath {quoted(p)})" for p in readable)
        return "\n".join([
            "(version 1)",
            "(allow default)",
            "(deny network*)",
            f"(deny file-write* (require-not (require-any (subpath {quoted(self.workdir)}) "
            '(literal "/dev/null") (literal "/dev/tty") (literal "/dev/dtracehelper"))))',
            f'(deny file-read-data (require-not (require-any (literal "/") {read_rules})))',
        ])

    def unwrap(self, outcome):
        exit_code, sig, *rest = outcome
        if self.platform.startswith("linux") and sig is None and exit_code is not None and exit_code > 128:
            # bwrap exits with 128 + the signal that ended the sandboxed process.
            try:
                return (None, signal.Signals(exit_code - 128).name, *rest)
            except ValueError:
                pass
        return outcome

    def wrap(self, argv, *, function_paths=()):
        if self.platform == "darwin":
            return [self.tool, "-p", self.seatbelt_profile(function_paths), *argv]
        return self.bwrap_argv(argv, function_paths=function_paths)
