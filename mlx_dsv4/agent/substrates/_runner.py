"""Child side of the process, sandbox and container substrates.

Run as ``python runner.py`` with a JSON spec on stdin. It imports nothing from
mlx_dsv4 (that would pull in MLX): it loads the tool's module while still trusted,
then applies the resource limits, drops to the unprivileged user, and either calls the
function (the result goes to stdout as JSON, anything the tool prints to stderr) or
replaces itself with the command.
"""

import importlib
import importlib.util
import json
import os
import resource
import signal
import sys
import traceback

RESULT_MARK = "\x00mlx-dsv4-result\x00"


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


def _confine(spec):
    limits = spec.get("limits") or {}
    drop = spec.get("drop")
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_CPU, limits.get("cpu_seconds"))
    _set_limit(resource.RLIMIT_FSIZE, limits.get("file_size_bytes"))
    if limits.get("max_processes") is not None and hasattr(resource, "RLIMIT_NPROC"):
        # The limit is per user, so it counts what the user already runs.
        uid = drop["uid"] if drop else os.getuid()
        _set_limit(resource.RLIMIT_NPROC, _tasks_of(uid) + int(limits["max_processes"]))
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
    if spec["mode"] == "command":
        try:
            _confine(spec)
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
        _confine(spec)
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
