"""The execution substrates hold their limits: each test makes a tool misbehave and
checks that the damage is contained and reported as a result, never raised."""

import ctypes
import importlib
import os
import random
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mlx_dsv4.agent import (
    ContainerSubstrate,
    FunctionSubstrate,
    ProcessSubstrate,
    SandboxSubstrate,
    SubstrateUnavailable,
    Tool,
    make_substrate,
    shell_tool,
)
from mlx_dsv4.agent.substrates import sandbox as sandbox_module

# Tools for child processes must be importable by a fresh interpreter, and their
# module must not pull in MLX (slow to import), so they live in a generated module.
PROBES = '''
import os, socket, time
import encodings.idna  # as root, tools run as nobody and cannot import lazily from a private interpreter

def add(a, b):
    print("adding", a, b)
    return a + b

def spin():
    while True:
        pass

def allocate(megabytes):
    block = bytearray(megabytes << 20)
    return len(block)

def write_file(name, megabytes):
    chunk = b"x" * (1 << 20)
    with open(name, "wb") as f:
        for _ in range(megabytes):
            f.write(chunk)
    return os.path.getsize(name)

def fork_many(attempts):
    forked, refused = 0, 0
    for _ in range(attempts):
        try:
            pid = os.fork()
        except OSError:
            refused += 1
            continue
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        forked += 1
    return {"forked": forked, "refused": refused}

def read_text(path):
    with open(path) as f:
        return f.read()

def connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        return "connected"

def environment():
    return dict(os.environ)

def where():
    return os.getcwd()

def fail():
    raise RuntimeError("tool failed on purpose")
'''


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("probe_module")
    (directory / "agent_probe_tools.py").write_text(PROBES)
    os.chmod(directory, 0o755)
    sys.path.insert(0, str(directory))
    import agent_probe_tools

    yield agent_probe_tools
    sys.path.remove(str(directory))
    sys.modules.pop("agent_probe_tools", None)


def tool_of(function):
    return Tool(function.__name__, "", {"type": "object"}, function=function)


def command(argv):
    return Tool("cmd", "", {"type": "object"}, command=lambda _: argv)


def sh(script):
    return command(["/bin/sh", "-c", script])


def bwrap_works():
    try:
        SandboxSubstrate().close()
        return True
    except SubstrateUnavailable:
        return False


needs_sandbox = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not bwrap_works(),
    reason="bubblewrap is not installed or cannot create namespaces here",
)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT semantics checked on Linux")


def tight(cls=ProcessSubstrate, **overrides):
    options = dict(timeout=3.0, memory_bytes=512 << 20, file_size_bytes=1 << 20, max_processes=16,
                   output_bytes=4096)
    options.update(overrides)
    return cls(**options)


@pytest.fixture(params=["process", pytest.param("sandbox", marks=needs_sandbox)])
def confined(request):
    kind = ProcessSubstrate if request.param == "process" else SandboxSubstrate
    made = []

    def make(**overrides):
        substrate = tight(kind, **overrides)
        made.append(substrate)
        return substrate

    yield make
    for substrate in made:
        substrate.close()


# -- function ------------------------------------------------------------------------


def test_function_substrate_reports_exceptions_as_results(probes):
    substrate = FunctionSubstrate()
    assert substrate.run(tool_of(probes.add), {"a": 2, "b": 3}).value == 5
    failed = substrate.run(tool_of(probes.fail), {})
    assert failed.status == "error" and "tool failed on purpose" in failed.error


# -- process and sandbox: limits -----------------------------------------------------


def test_function_tool_runs_in_a_child_with_output_separate_from_result(confined, probes):
    result = confined().run(tool_of(probes.add), {"a": 2, "b": 40})
    assert result.status == "ok" and result.value == 42
    assert result.output == "adding 2 40\n"
    failed = confined().run(tool_of(probes.fail), {})
    assert failed.status == "error" and "RuntimeError: tool failed on purpose" in failed.error


def test_runaway_loop_is_killed_at_the_wall_clock_timeout(confined, probes):
    substrate = confined(timeout=1.0, cpu_seconds=60)
    start = time.monotonic()
    result = substrate.run(tool_of(probes.spin), {})
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and "1 s time limit" in result.error
    assert elapsed < 3.0
    slept = substrate.run(sh("sleep 30"), {})
    assert slept.status == "timeout" and slept.duration_s < 3.0


@linux_only
def test_cpu_limit_stops_a_busy_loop_before_the_timeout(probes):
    with tight(timeout=20.0, cpu_seconds=1) as substrate:
        result = substrate.run(tool_of(probes.spin), {})
    assert result.status == "killed" and result.signal in ("SIGXCPU", "SIGKILL")
    assert result.duration_s < 15.0


@linux_only
def test_ten_gigabyte_write_is_stopped_at_the_file_size_limit(confined, probes):
    substrate = confined(file_size_bytes=1 << 20)
    python_write = substrate.run(tool_of(probes.write_file), {"name": "big.bin", "megabytes": 10240})
    assert python_write.status == "error" and "File too large" in python_write.error
    assert os.path.getsize(os.path.join(substrate.workdir, "big.bin")) <= 1 << 20
    shell_write = substrate.run(command(["dd", "if=/dev/zero", "of=big2.bin", "bs=1M", "count=10240"]), {})
    assert shell_write.status == "killed" and shell_write.signal == "SIGXFSZ"
    assert os.path.getsize(os.path.join(substrate.workdir, "big2.bin")) <= 1 << 20


def _processes():
    """{pid: (command line, state, session id)} of every process on the machine."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                stat_line = f.read()
        except OSError:
            continue
        fields = stat_line[stat_line.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry)] = (cmdline, fields[0], int(fields[3]))
    return table


def _live_processes_of(marker, sessions):
    """Processes not yet dead (zombies wait for a parent to reap them) whose command line holds
    ``marker`` or that belong to one of ``sessions``."""
    return [pid for pid, (cmdline, state, session) in _processes().items()
            if state not in "ZX" and (marker.encode() in cmdline or session in sessions)]


@linux_only
def test_fork_bomb_is_held_to_the_process_limit_and_cleaned_up(confined, probes):
    # The count gets a loaded machine's time to start (its children sleep, so it returns as
    # soon as the loop ends); the bomb keeps the short timeout its kill is checked against.
    counted = confined(max_processes=8, timeout=20.0).run(tool_of(probes.fork_many), {"attempts": 40})
    assert counted.status == "ok", (counted.status, counted.error)
    assert counted.value["forked"] <= 8 and counted.value["refused"] >= 32, counted.value
    substrate = confined(max_processes=8, timeout=3.0)
    # Every process of the bomb carries the marker in its command line: the forked shells
    # keep the script, and sleep gets it as an argument (sleep adds up its arguments; the
    # marker is a fraction of a second). So the bomb's session is found among whatever
    # else runs on the machine, under any user.
    marker = f"0.{random.SystemRandom().randrange(10**17, 10**18)}"
    sessions, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            sessions.update(session for cmdline, state, session in _processes().values()
                            if marker.encode() in cmdline)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        bomb = substrate.run(sh(f"b() {{ b | b & }}; b; sleep 30 {marker}"), {})
    finally:
        done.set()
        watcher.join()
    assert bomb.status in ("timeout", "error", "ok", "killed")
    assert bomb.duration_s < 6.0
    # With the user's processes at the limit (other tools of that user running), the first
    # fork already fails and ends the shell; a bomb that ran until the kill was seen.
    assert sessions or bomb.status == "error"
    assert os.getsid(0) not in sessions
    time.sleep(0.3)
    assert _live_processes_of(marker, sessions) == []  # nothing of the bomb survives the kill


def test_memory_limit_turns_a_huge_allocation_into_an_error(confined, probes):
    result = confined(memory_bytes=256 << 20).run(tool_of(probes.allocate), {"megabytes": 2048})
    assert result.status == "error" and "MemoryError" in result.error


def test_output_is_capped(confined):
    result = confined(output_bytes=1000).run(command(["yes"]), {})
    assert result.status == "output_limit" and result.truncated
    assert len(result.output) <= 1000


def test_environment_is_scrubbed_and_workdir_private(confined, probes, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    substrate = confined()
    env = substrate.run(tool_of(probes.environment), {}).value
    assert "SECRET_TOKEN" not in env
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "LC_CTYPE", "PWD"}
    assert env["HOME"] == substrate.workdir
    assert substrate.run(tool_of(probes.where), {}).value == substrate.workdir
    assert stat.S_IMODE(os.stat(substrate.workdir).st_mode) == 0o700
    other = confined()
    assert other.workdir != substrate.workdir
    workdir = substrate.workdir
    substrate.close()
    assert not os.path.exists(workdir)


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop happens only as root")
def test_root_runs_tools_as_nobody(confined):
    result = confined().run(command(["id", "-u"]), {})
    assert result.output.strip() == "65534"


def test_command_tool_missing_program_is_an_error_result(confined):
    result = confined().run(command(["/no/such/program"]), {})
    assert result.status == "error" and result.exit_code == 127


def test_local_function_cannot_leave_the_process():
    def local(x):
        return x

    result = tight().run(tool_of(local), {"x": 1})
    assert result.status == "error" and "module-level" in result.error


# -- sandbox: isolation --------------------------------------------------------------


@pytest.fixture
def open_dir():
    """A world-readable directory (pytest's own temp root is private to its user)."""
    path = tempfile.mkdtemp(prefix="agent-test-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@needs_sandbox
def test_sandbox_cannot_read_outside_its_directory(probes, open_dir):
    secret = open_dir / "secret.txt"
    secret.write_text("top secret")
    os.chmod(secret, 0o644)
    with tight(ProcessSubstrate) as plain:
        assert plain.run(tool_of(probes.read_text), {"path": str(secret)}).value == "top secret"
    with tight(SandboxSubstrate) as sandbox:
        by_function = sandbox.run(tool_of(probes.read_text), {"path": str(secret)})
        assert by_function.status == "error" and "top secret" not in by_function.output
        by_shell = sandbox.run(sh(f"cat {secret}"), {})
        assert by_shell.status == "error" and "top secret" not in by_shell.output
        assert sandbox.run(sh("cat /etc/shadow /etc/hostname"), {}).status == "error"
        with open(os.path.join(sandbox.workdir, "inside.txt"), "w") as f:
            f.write("mine")
        assert sandbox.run(sh("cat inside.txt"), {}).output == "mine"


@needs_sandbox
def test_sandbox_cannot_open_a_socket(probes):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        with tight(ProcessSubstrate) as plain:
            assert plain.run(tool_of(probes.connect), {"port": port}).value == "connected"
        with tight(SandboxSubstrate) as sandbox:
            result = sandbox.run(tool_of(probes.connect), {"port": port})
            assert result.status == "error" and ("refused" in result.error or "unreachable" in result.error)
            outward = sandbox.run(tool_of(probes.connect), {"port": 80})
            assert outward.status == "error"
    finally:
        server.close()


@needs_sandbox
def test_sandbox_filesystem_is_read_only_outside_the_workdir(open_dir):
    shared = open_dir
    (shared / "notes.txt").write_text("TODO: read me\n")
    with tight(SandboxSubstrate, read_only=[shared]) as sandbox:
        assert sandbox.run(sh(f"cat {shared}/notes.txt"), {}).output == "TODO: read me\n"
        for target in (f"{shared}/new.txt", "/tmp/escape.txt", "/usr/escape.txt", "/escape.txt"):
            assert sandbox.run(sh(f"echo x > {target}"), {}).status == "error", target
        assert sandbox.run(sh("echo ok > here.txt && cat here.txt"), {}).output == "ok\n"
    assert sorted(os.listdir(shared)) == ["notes.txt"]


# -- refusing rather than degrading ----------------------------------------------------


def test_sandbox_refuses_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    with pytest.raises(SubstrateUnavailable, match="bubblewrap"):
        SandboxSubstrate(platform="linux")
    with pytest.raises(SubstrateUnavailable, match="sandbox-exec"):
        SandboxSubstrate(platform="darwin")
    with pytest.raises(SubstrateUnavailable):
        make_substrate("sandbox", platform="linux")


def test_sandbox_refuses_when_bubblewrap_cannot_create_namespaces(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: str(fake))
    with pytest.raises(SubstrateUnavailable, match="No permissions"):
        SandboxSubstrate(platform="linux")


def test_macos_profile_denies_network_and_foreign_files(monkeypatch, tmp_path):
    fake = tmp_path / "sandbox-exec"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: str(fake))
    with SandboxSubstrate(platform="darwin", read_only=[tmp_path]) as sandbox:
        profile = sandbox.seatbelt_profile()
        argv = sandbox.wrap(["python", "runner.py"])
        workdir = os.path.realpath(sandbox.workdir)
    assert "(deny network*)" in profile
    assert f'(deny file-write* (require-not (require-any (subpath "{workdir}")' in profile
    assert "(deny file-read-data (require-not" in profile and f'(subpath "{os.path.realpath(tmp_path)}")' in profile
    assert argv[:2] == [str(fake), "-p"] and argv[-2:] == ["python", "runner.py"]


def test_container_refuses_without_a_working_runtime(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SubstrateUnavailable, match="docker or podman"):
        ContainerSubstrate()
    broken = tmp_path / "docker"
    broken.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(SubstrateUnavailable, match="Cannot connect to the Docker daemon"):
        ContainerSubstrate()


def test_container_runs_commands_isolated(monkeypatch, tmp_path):
    record = tmp_path / "argv.txt"
    fake = tmp_path / "podman"
    fake.write_text(f'#!/bin/sh\n[ "$1" = info ] && exit 0\nprintf "%s\\n" "$@" > {record}\necho from-container\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with ContainerSubstrate(image="alpine:3", runtime="podman", max_processes=16, memory_bytes=1 << 28) as box:
        result = box.run(shell_tool(), {"command": "echo hi"})
        workdir = box.workdir
    assert result.status == "ok" and result.output == "from-container\n"
    argv = record.read_text().split("\n")
    for flag, value in (("--network", "none"), ("--pids-limit", "16"), ("--memory", str(1 << 28)),
                        ("--user", "65534:65534"), ("--pull", "never")):
        assert argv[argv.index(flag) + 1] == value
    assert "--read-only" in argv and f"{workdir}:/work:rw" in argv
    assert argv[argv.index("alpine:3") + 1 :] == ["/bin/sh", "-c", "echo hi", ""]


# -- what the caller's process and folders leave within the tool's reach ---------------

PROJECT_TOOLS = '''
import ctypes, os, socket, subprocess

def listing(path):
    return sorted(os.listdir(path))

def read_text(path):
    with open(path) as f:
        return f.read()

def connect_unix(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(path)
        return "connected"

def sockets_in_view():
    found = subprocess.run(["find", "/", "-path", "/proc", "-prune", "-o", "-type", "s", "-print"],
                           capture_output=True, text=True)
    return found.stdout.split()

KEY_SYSCALLS = {"x86_64": (249, 250), "aarch64": (218, 219)}  # request_key, keyctl

def session_key(description):
    request_key, keyctl = KEY_SYSCALLS[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    serial = libc.syscall(ctypes.c_long(request_key), b"user", description.encode(), None, 0)
    if serial < 0:
        raise OSError(ctypes.get_errno(), "no such key in reach")
    payload = ctypes.create_string_buffer(256)
    size = libc.syscall(ctypes.c_long(keyctl), 11, serial, payload, 256)  # KEYCTL_READ
    if size < 0:
        raise OSError(ctypes.get_errno(), "cannot read the key")
    return payload.raw[:size].decode()

def agent_environment(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().decode(errors="replace")

def agent_open_file(pid, fd):
    with open(f"/proc/{pid}/fd/{fd}") as f:
        return f.read()
'''


@pytest.fixture
def project(request):
    """An agent's project folder as a sandbox user would see it: the tools' module next to
    a private key and a listening Unix socket, the folder on sys.path."""
    folder = Path(tempfile.mkdtemp(prefix="agent-project-"))
    os.chmod(folder, 0o755)
    name = "project_tools_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    (folder / f"{name}.py").write_text(PROJECT_TOOLS)
    key = folder / "id_ed25519"
    key.write_text("PRIVATE KEY MATERIAL")
    os.chmod(key, 0o644)  # readable by the unprivileged user tools run as under root
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / "agent.sock"))
    os.chmod(folder / "agent.sock", 0o777)
    listener.listen(4)
    sys.path.insert(0, str(folder))
    module = __import__(name)
    yield folder, module
    sys.path.remove(str(folder))
    sys.modules.pop(name, None)
    listener.close()
    shutil.rmtree(folder, ignore_errors=True)


@needs_sandbox
def test_sandbox_function_tool_sees_only_its_module_of_the_project_folder(project):
    folder, tools = project
    key, sock = str(folder / "id_ed25519"), str(folder / "agent.sock")
    with tight(ProcessSubstrate) as plain:  # the same tool outside the sandbox reaches both
        assert plain.run(tool_of(tools.read_text), {"path": key}).value == "PRIVATE KEY MATERIAL"
        assert plain.run(tool_of(tools.connect_unix), {"path": sock}).value == "connected"
    with tight(SandboxSubstrate, timeout=20.0) as sandbox:
        assert sandbox.run(tool_of(tools.listing), {"path": str(folder)}).value == [f"{tools.__name__}.py"]
        read = sandbox.run(tool_of(tools.read_text), {"path": key})
        assert read.status == "error" and "FileNotFoundError" in read.error
        connected = sandbox.run(tool_of(tools.connect_unix), {"path": sock})
        assert connected.status == "error" and "FileNotFoundError" in connected.error
        assert sandbox.run(tool_of(tools.sockets_in_view), {}).value == []


@needs_sandbox
def test_sandbox_function_tool_from_a_package_sees_its_package_only(open_dir, request):
    package = "agent_project_package_" + str(os.getpid())
    (open_dir / package).mkdir()
    (open_dir / package / "__init__.py").write_text("")
    (open_dir / package / "helpers.py").write_text("GREETING = 'hello from the package'\n")
    (open_dir / package / "tools.py").write_text(
        "import os\nfrom .helpers import GREETING\n\n"
        "def look(folder):\n    return GREETING, sorted(os.listdir(folder))\n")
    (open_dir / ".env").write_text("API_KEY=secret")
    for path in (open_dir / package, *(open_dir / package).iterdir(), open_dir / ".env"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    sys.path.insert(0, str(open_dir))
    request.addfinalizer(lambda: sys.path.remove(str(open_dir)))
    request.addfinalizer(lambda: [sys.modules.pop(n) for n in list(sys.modules) if n.startswith(package)])
    tools = importlib.import_module(f"{package}.tools")
    with tight(SandboxSubstrate, timeout=20.0) as sandbox:
        result = sandbox.run(tool_of(tools.look), {"folder": str(open_dir)})
    assert result.status == "ok", result.error
    assert result.value == ["hello from the package", [package]]


@needs_sandbox
def test_sandbox_network_namespace_hides_abstract_unix_sockets(project):
    _, tools = project
    listener = socket.socket(socket.AF_UNIX)
    name = f"\0mlx-dsv4-test-{os.getpid()}"
    listener.bind(name)
    listener.listen(1)
    try:
        with tight(ProcessSubstrate) as plain:
            assert plain.run(tool_of(tools.connect_unix), {"path": name}).value == "connected"
        with tight(SandboxSubstrate) as sandbox:
            refused = sandbox.run(tool_of(tools.connect_unix), {"path": name})
            assert refused.status == "error" and "ConnectionRefusedError" in refused.error
    finally:
        listener.close()


def readable_in_profile(profile, path):
    """Whether the profile's file-read-data rule lets ``path`` be read."""
    rule = next(line for line in profile.splitlines() if line.startswith("(deny file-read-data"))
    for kind, allowed in re.findall(r'\((subpath|literal) "([^"]*)"\)', rule):
        if path == allowed or (kind == "subpath" and path.startswith(allowed.rstrip("/") + "/")):
            return True
    return False


def test_macos_profile_reads_only_the_tool_module_of_the_project_folder(monkeypatch, tmp_path, project):
    folder, tools = project
    record = tmp_path / "profile.sb"
    fake = tmp_path / "sandbox-exec"
    fake.write_text(f'#!/bin/sh\nprintf "%s" "$2" > {record}\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: str(fake))
    with SandboxSubstrate(platform="darwin") as sandbox:
        sandbox.run(tool_of(tools.listing), {"path": str(folder)})
    profile = record.read_text()
    assert readable_in_profile(profile, os.path.realpath(tools.__file__))
    for private in (folder / "id_ed25519", folder / "agent.sock", folder):
        assert not readable_in_profile(profile, os.path.realpath(private)), private
    for needed in (sandbox_module.RUNNER, os.path.join(sys.base_prefix, "lib")):
        assert readable_in_profile(profile, os.path.realpath(needed)), needed
    assert "(deny network*)" in profile  # on macOS this covers connecting to Unix sockets


@linux_only
def test_tool_cannot_read_the_agents_environment_or_open_files_through_proc(confined, project):
    _, tools = project
    with open("/proc/self/environ", "rb") as f:
        agent_environ = f.read().decode(errors="replace")
    first_variable = agent_environ.split("\0")[0]
    pid = os.getpid()
    with tempfile.TemporaryFile("w+") as held:  # unlinked: reachable only through the agent's descriptor
        held.write("HELD OPEN BY THE AGENT")
        held.flush()
        substrate = confined(user=False)  # the tool keeps the agent's own user
        environ = substrate.run(tool_of(tools.agent_environment), {"pid": pid})
        assert environ.status == "error", "the tool read the agent's environment"
        assert "PermissionError" in environ.error or "FileNotFoundError" in environ.error
        opened = substrate.run(tool_of(tools.agent_open_file), {"pid": pid, "fd": held.fileno()})
        assert opened.status == "error", "the tool opened a file through the agent's descriptor"
        assert "PermissionError" in opened.error or "FileNotFoundError" in opened.error
        by_shell = substrate.run(sh(f"cat /proc/{pid}/environ /proc/{pid}/fd/{held.fileno()}"), {})
    assert by_shell.status == "error"
    assert first_variable not in by_shell.output and "HELD OPEN" not in by_shell.output


@pytest.fixture
def agent_session_key():
    """A key in the agent's kernel session keyring, as Kerberos or keyctl users keep them."""
    numbers = {"x86_64": (248, 250), "aarch64": (217, 219)}.get(os.uname().machine)  # add_key, keyctl
    if not sys.platform.startswith("linux") or numbers is None:
        pytest.skip("kernel keyrings are checked on x86-64 and arm64 Linux")
    libc = ctypes.CDLL(None, use_errno=True)
    description = f"mlx-dsv4-test-{os.getpid()}"
    serial = libc.syscall(ctypes.c_long(numbers[0]), b"user", description.encode(), b"KEYRING SECRET", 14, -3)
    if serial < 0:
        pytest.skip(f"keyrings are not permitted here (errno {ctypes.get_errno()})")
    yield description
    libc.syscall(ctypes.c_long(numbers[1]), 21, serial)  # KEYCTL_INVALIDATE


def test_tool_does_not_inherit_the_agents_session_keyring(confined, project, agent_session_key):
    _, tools = project
    in_process = FunctionSubstrate().run(tool_of(tools.session_key), {"description": agent_session_key})
    assert in_process.value == "KEYRING SECRET"
    for user in (None, False):
        result = confined(user=user).run(tool_of(tools.session_key), {"description": agent_session_key})
        assert result.status == "error" and "no such key in reach" in result.error, user
