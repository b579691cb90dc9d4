"""Child side of the process, sandbox and container substrates.

Run as ``python runner.py`` with a JSON spec on stdin. It imports nothing from
mlx_dsv4 (that would pull in MLX): it leaves the agent's kernel session keyring, enters
a user namespace of its own when asked (while it still has a single thread), loads the
tool's module while still trusted, then applies the resource limits, drops to the
unprivileged user, and either calls the function (the result goes to stdout as JSON,
anything the tool prints to stderr) or replaces itself with the command.
"""

import ctypes
import importlib
import importlib.util
import json
import os
import resource
import signal
import sys
import traceback

RESULT_MARK = "\x00mlx-dsv4-result\x00"
CLONE_NEWUSER = 0x10000000
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_SYSCALL = {"x86_64": 250, "aarch64": 219, "arm64": 219, "riscv64": 219}


def _leave_session_keyring():
    """Join a new, empty session keyring. The one inherited from the agent holds keys
    that any process started from it may read (Kerberos tickets, tokens stored with
    keyctl), whatever its user or namespaces. False where this is not possible."""
    number = KEYCTL_SYSCALL.get(os.uname().machine) if sys.platform.startswith("linux") else None
    if number is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(ctypes.c_long(number), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None) >= 0


def _enter_user_namespace():
    """Move into a new user namespace that maps only our own user and group. Reading
    another process's /proc/<pid>/environ, fd or mem needs CAP_SYS_PTRACE in that
    process's namespace, which nothing here has, so the agent's environment and open
    files are out of reach. False where user namespaces are not permitted."""
    if not sys.platform.startswith("linux"):
        return False
    uid, gid = os.getuid(), os.getgid()
    if hasattr(os, "unshare"):
        try:
            os.unshare(CLONE_NEWUSER)
        except OSError:
            return False
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER) != 0:
            return False
    # Without the maps the ids show as the overflow user; access checks stay the same.
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass
    return True


def _tasks_of(uid):
    """Tasks (threads count: RLIMIT_NPROC counts them) currently owned by ``uid``."""
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        try:
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields.get("Threads", "1"))
        except (KeyError, ValueError):
            continue
    return total


def _set_limit(kind, value):
    if value is None:
        return
    value = int(value)
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _confine(spec, namespaced=False):
    limits = spec.get("limits") or {}
    drop = spec.get("drop")
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_CPU, limits.get("cpu_seconds"))
    _set_limit(resource.RLIMIT_FSIZE, limits.get("file_size_bytes"))
    if limits.get("max_processes") is not None and hasattr(resource, "RLIMIT_NPROC"):
        if namespaced:
            # Counted per user within the namespace: only this process's threads so far.
            running = len(os.listdir("/proc/self/task"))
        else:
            # The limit is per user, so it counts what the user already runs.
            running = _tasks_of(drop["uid"] if drop else os.getuid())
        _set_limit(resource.RLIMIT_NPROC, running + int(limits["max_processes"]))
    if limits.get("memory_bytes") is not None:
        _set_limit(resource.RLIMIT_AS, limits["memory_bytes"])
    os.chdir(spec["workdir"])
    if drop:
        os.setgroups([])
        os.setgid(drop["gid"])
        os.setuid(drop["uid"])
        if os.getuid() != drop["uid"] or os.geteuid() != drop["uid"]:
            raise RuntimeError("could not drop privileges")


def _load_function(spec):
    for entry in reversed(spec.get("sys_path") or []):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    module_name, path = spec["module"], spec.get("file")
    module = None
    if module_name != "__main__":
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if not path:
                raise
    if module is None:
        # A script's functions (or a module loaded from a path) are found by file.
        loader_spec = importlib.util.spec_from_file_location("_mlx_dsv4_tool_module", path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules["_mlx_dsv4_tool_module"] = module
        loader_spec.loader.exec_module(module)
    target = module
    for part in spec["qualname"].split("."):
        target = getattr(target, part)
    return target


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _report(stream, payload):
    stream.write(RESULT_MARK + json.dumps(payload, default=repr) + "\n")
    stream.flush()


def main():
    spec = json.loads(sys.stdin.readline())
    _leave_session_keyring()
    namespaced = bool(spec.get("user_namespace")) and _enter_user_namespace()
    if spec["mode"] == "command":
        try:
            _confine(spec, namespaced)
            # Python ignores these; a command must die of them as it would from a shell.
            for name in ("SIGPIPE", "SIGXFSZ", "SIGXCPU"):
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
            os.execvpe(spec["argv"][0], spec["argv"], os.environ)
        except OSError as err:
            sys.stderr.write(f"cannot run {spec['argv'][0]!r}: {err}\n")
            os._exit(127)
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the tool prints is output, not its result
    try:
        function = _load_function(spec)
        _confine(spec, namespaced)
    except BaseException as err:  # noqa: BLE001 - everything is reported to the parent
        _report(result, {"ok": False, "error": f"cannot start the tool: {type(err).__name__}: {err}"})
        os._exit(1)
    try:
        value = function(**spec["arguments"])
        try:
            _report(result, {"ok": True, "value": value})
        except (TypeError, ValueError):
            _report(result, {"ok": True, "value": repr(value)})
    except BaseException as err:  # noqa: BLE001
        lines = traceback.format_exception_only(type(err), err)
        _report(result, {"ok": False, "error": "".join(lines).strip()})
        _flush()
        os._exit(1)
    _flush()
    os._exit(0)


if __name__ == "__main__":
    main()
