"""``microvm`` and ``vm``: each tool call boots a fresh virtual machine with its own
kernel, so a tool that escapes its process (a kernel exploit, a fork bomb, a memory bomb)
is still inside the VM.

Linux: QEMU. ``microvm`` is ``qemu-system-x86_64 -M microvm`` (virtio-mmio devices, no
firmware, no PCI); ``vm`` is ``-M q35`` (virtio-pci, SeaBIOS). KVM (``-enable-kvm -cpu
host``) where /dev/kvm can be opened, TCG (emulation, slower) otherwise; ``accelerator``
says which, and every result carries it in ``extra``.
macOS: Apple's Virtualization framework through ``vfkit``; without it the substrate
refuses. The guest (``guest.py``) is built on Linux; on macOS pass ``kernel`` and
``initramfs`` (an arm64 build of the same layout).

The guest sees one share, read-only: the tool call, the runner of the process
substrate and the tool's own module (or the directories of its package); nothing else of
the host. Python function tools import only the standard library and their own package
there. The working directory is a tmpfs, empty at each call. No network device unless
the tool declares ``network`` (then QEMU's user-mode network: outbound only, the host
at 10.0.2.2). Limits: ``-m`` memory, ``-smp`` CPUs, the process limits inside the
guest, and the wall-clock ``timeout``, after which the whole QEMU process group is
killed (``boot_timeout`` more seconds are allowed for the boot).

The outcome comes back over a virtio-serial port of its own (``org.mlx-dsv4.result``,
written by the guest's runner as root once the tool has exited, into a file of the call's
temporary directory outside the share); the serial console only carries boot messages and
panics, which the host reads when no outcome came.
"""

import base64
import binascii
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict

from .guest import GuestBuildError, guest
from .base import (
    RUNNER,
    ExecutionResult,
    Substrate,
    SubstrateUnavailable,
    function_spec,
    interpret_command,
    interpret_function,
    run_child,
    tool_source,
)
from .process import Limits

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py")
GUEST_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest_main.py")
RESULT_PORT = "org.mlx-dsv4.result"  # the virtio-serial port the guest writes the outcome to
RESULT_FIELDS = ("exit_code", "signal", "stdout", "stderr", "status", "truncated", "duration")
SHARE_IN_GUEST = "/tool"
NOBODY = {"uid": 65534, "gid": 65534}


KVM_CPUS = ("host", "host,-arch-capabilities")  # some nested hosts refuse the MSR of the latter
_accelerators = {}


def kvm_openable(path="/dev/kvm"):
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _host_tsc_khz():
    """The host's clock rate, which TCG's time stamp counter follows (microvm has no timer
    the guest kernel could measure it against)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2000000


class MicroVMSubstrate(Substrate):
    """A fresh microVM per tool call; see the module docstring.

    ``memory_mb`` defaults to the memory limit plus 256 MiB for the guest's kernel and
    Python (512 without a limit); ``cpus`` is ``-smp``. ``network=True`` gives every tool
    of this substrate the user-mode network; a tool's own ``network`` flag does so for
    that tool. ``accelerator``: "kvm" or "tcg" (default: kvm where usable).
    Raises ``SubstrateUnavailable`` at construction when QEMU (or on macOS vfkit) is
    missing; the guest is built at the first call.
    """

    name = "microvm"
    machine = "microvm"
    bus = "device"  # virtio-mmio: virtio-9p-device, virtio-net-device

    def __init__(self, limits=None, *, memory_mb=None, cpus=1, network=False, boot_timeout=None,
                 accelerator=None, kernel=None, initramfs=None, platform=None, qemu=None, vfkit=None,
                 **limit_overrides):
        self.limits = limits or Limits()
        if limit_overrides:
            self.limits = Limits(**{**asdict(self.limits), **limit_overrides})
        if memory_mb is None:
            memory_mb = (self.limits.memory_bytes >> 20) + 256 if self.limits.memory_bytes else 512
        self.memory_mb = int(memory_mb)
        self.cpus = int(cpus)
        self.network = bool(network)
        self.platform = platform or sys.platform
        self.kernel, self.initramfs = kernel, initramfs
        if self.platform.startswith("linux"):
            self.executable = qemu or shutil.which("qemu-system-x86_64")
            if self.executable is None:
                raise SubstrateUnavailable(
                    f"the {self.name} substrate needs QEMU (qemu-system-x86_64), which is not installed; install it "
                    "(apt-get install qemu-system-x86 / dnf install qemu-system-x86) or choose another substrate")
            self.accelerator = accelerator or os.environ.get("MLX_DSV4_VM_ACCEL") or None
            self.kvm_cpu = KVM_CPUS[0]
            if self.accelerator not in (None, "kvm", "tcg"):
                raise ValueError(f"accelerator must be kvm or tcg, got {self.accelerator!r}")
        elif self.platform == "darwin":
            self.executable = vfkit or shutil.which("vfkit")
            if self.executable is None:
                raise SubstrateUnavailable(
                    f"the {self.name} substrate on macOS needs vfkit (Apple's Virtualization framework), which is "
                    "not installed; install it (brew install vfkit) or choose another substrate")
            self.accelerator = "hvf"
        else:
            raise SubstrateUnavailable(f"no {self.name} substrate on {self.platform}")
        self._boot_timeout = boot_timeout

    @property
    def boot_timeout(self):
        if self._boot_timeout is not None:
            return float(self._boot_timeout)
        return 20.0 if self.accelerator in ("kvm", "hvf") else 120.0

    # -- command lines -----------------------------------------------------------

    def kernel_cmdline(self, network):
        console = "hvc0" if self.platform == "darwin" else "ttyS0"
        share = "virtiofs" if self.platform == "darwin" else "9p"
        # Skipping the crypto self-tests, watchdogs and speculation mitigations shortens the
        # boot most under TCG; the guest lives for one call and holds nothing of the host's.
        words = [f"console={console}", "quiet", "loglevel=1", "panic=-1", "reboot=t", "rdinit=/init",
                 "cryptomgr.notests", "mitigations=off", "nowatchdog", "audit=0", "8250.nr_uarts=1",
                 "i8042.noaux", "i8042.nopnp", "random.trust_cpu=on", f"mlx.console={console}", f"mlx.share={share}"]
        # vfkit's second virtio-serial device is a console of its own (hvc1); QEMU's port has a name.
        words.append("mlx.result=hvc1" if self.platform == "darwin" else f"mlx.result={RESULT_PORT}")
        if network:
            words.append("mlx.net=1")
        if self.accelerator == "tcg" and self.machine == "microvm":
            words += [f"tsc_early_khz={_host_tsc_khz()}", "no_timer_check"]
        return " ".join(words)

    def qemu_argv(self, share, *, network=False, result=None):
        accel = ["-enable-kvm", "-cpu", self.kvm_cpu] if self.accelerator == "kvm" else ["-accel", "tcg", "-cpu", "max"]
        argv = [self.executable, "-M", self.machine, *accel, "-m", f"{self.memory_mb}M", "-smp", str(self.cpus),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none",
                "-kernel", self.kernel, "-initrd", self.initramfs, "-append", self.kernel_cmdline(network)]
        if share is None:
            return argv
        argv += ["-fsdev", f"local,id=tool,path={share.replace(',', ',,')},security_model=none,readonly=on",
                "-device", f"virtio-9p-{self.bus},fsdev=tool,mount_tag=tool"]
        if result is not None:
            argv += ["-chardev", f"file,id=mlxresult,path={result.replace(',', ',,')}",
                     "-device", f"virtio-serial-{self.bus}",
                     "-device", f"virtserialport,chardev=mlxresult,name={RESULT_PORT}"]
        if network:
            argv += ["-netdev", "user,id=net0", "-device", f"virtio-net-{self.bus},netdev=net0"]
        return argv

    def vfkit_argv(self, share, *, network=False, result=None):
        argv = [self.executable, "--cpus", str(self.cpus), "--memory", str(self.memory_mb),
                "--bootloader", f"linux,kernel={self.kernel},initrd={self.initramfs},"
                                f"cmdline=\"{self.kernel_cmdline(network)}\"",
                "--device", "virtio-serial,stdio"]
        if result is not None:
            argv += ["--device", f"virtio-serial,logFilePath={result}"]
        argv += ["--device", f"virtio-fs,sharedDir={share},mountTag=tool"]
        if network:
            argv += ["--device", "virtio-net,nat"]
        return argv

    def argv(self, share, *, network=False, result=None):
        if self.platform == "darwin":
            return self.vfkit_argv(share, network=network, result=result)
        return self.qemu_argv(share, network=network, result=result)

    # -- running -------------------------------------------------------------------

    def _ensure_guest(self):
        if not (self.kernel and self.initramfs):
            if self.platform == "darwin":
                raise GuestBuildError(
                    "the guest is built on Linux; on macOS pass kernel= and initramfs= (an arm64 build)")
            built = guest()
            self.kernel, self.initramfs = built.kernel, built.initramfs
        if self.accelerator is None:
            self.accelerator, self.kvm_cpu = self._probe_kvm()

    def _probe_kvm(self):
        """("kvm", cpu model) when a KVM guest boots here, else ("tcg", None): /dev/kvm
        may open and still not run a guest (nested virtualisation without support)."""
        key = (self.executable, self.kernel, self.initramfs)
        if key not in _accelerators:
            _accelerators[key] = ("tcg", None)
            if kvm_openable():
                for cpu in KVM_CPUS:
                    self.accelerator, self.kvm_cpu = "kvm", cpu
                    outcome = run_child(self.qemu_argv(None), timeout=8.0, output_bytes=1 << 20)
                    if b"mlx-dsv4 guest: no tool share" in outcome[2]:
                        _accelerators[key] = ("kvm", cpu)
                        break
        return _accelerators[key]

    def run(self, tool, arguments):
        network = self.network or bool(getattr(tool, "network", False))
        try:
            self._ensure_guest()
            if tool.command is not None:
                argv = tool.command(arguments)
                if isinstance(argv, str) or not argv:
                    raise ValueError("a command is a non-empty list of strings")
                result = self._boot({"mode": "command", "argv": [str(a) for a in argv]}, {}, site=False,
                                    network=network, interpret=interpret_command)
            else:
                spec = function_spec(tool.function, arguments)
                result = self._boot(spec, tool_source(spec)[0], site=True,
                                    network=network, interpret=interpret_function)
        except SubstrateUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - a broken tool or guest must not end the agent
            result = ExecutionResult("error", error=f"{type(err).__name__}: {err}")
        result.substrate = self.name
        result.extra.update(accelerator=self.accelerator, machine=self.machine, network=network)
        return result

    def _place_sources(self, spec, sources, share):
        """Copy the tool's module or package directories into the share and point the
        spec at their places in the guest."""
        src = os.path.join(share, "src")
        os.makedirs(src)
        moved = {}
        for path in sources:
            target = os.path.join(src, os.path.basename(path))
            if os.path.isdir(path):
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copyfile(path, target)
            moved[path] = SHARE_IN_GUEST + "/src/" + os.path.basename(path)
        if spec.get("file"):
            source = os.path.abspath(spec["file"])
            spec["file"] = None
            for path, inside in moved.items():
                if source == path or source.startswith(path + os.sep):
                    spec["file"] = inside + source[len(path):]
        spec["sys_path"] = [SHARE_IN_GUEST + "/src"]

    def _boot(self, spec, sources, *, site, network, interpret):
        limits = self.limits
        call_dir = tempfile.mkdtemp(prefix="mlx-dsv4-vm-call-")
        share = os.path.join(call_dir, "share")  # the result file stays outside the guest's share
        result_path = os.path.join(call_dir, "result.json")
        try:
            os.mkdir(share)
            if sources:
                self._place_sources(spec, sources, share)
            spec.update(limits=limits.for_runner(), workdir="/work", drop=NOBODY, user_namespace=False)
            call = {"spec": json.dumps(spec) + "\n", "site": site, "timeout": limits.timeout,
                    "output_bytes": limits.output_bytes}
            with open(os.path.join(share, "call.json"), "w") as f:
                json.dump(call, f)
            shutil.copyfile(RUNNER, os.path.join(share, "_runner.py"))
            shutil.copyfile(GUEST_MAIN, os.path.join(share, "guest_main.py"))
            shutil.copyfile(BASE, os.path.join(share, "substrate_base.py"))
            for root, dirs, files in os.walk(share):
                os.chmod(root, 0o755)
                for name in files:
                    os.chmod(os.path.join(root, name), 0o644)
            outcome = run_child(self.argv(share, network=network, result=result_path),
                                timeout=limits.timeout + self.boot_timeout,
                                output_bytes=4 * limits.output_bytes + (1 << 20))
            try:
                with open(result_path, "rb") as f:
                    written = f.read()
            except FileNotFoundError:
                written = b""
        finally:
            shutil.rmtree(call_dir, ignore_errors=True)
        _, _, console, stderr, status, _, duration = outcome
        if not written.strip():
            if status == "timeout":
                return ExecutionResult("timeout", error=f"the VM was killed after the {limits.timeout:g} s time limit "
                                       f"(plus {self.boot_timeout:g} s for the boot)", signal="SIGKILL",
                                       duration_s=duration)
            panic = re.search(rb"Kernel panic - not syncing: [^\r\n]*", console)
            tail = (console[-1500:] + b"\n" + stderr[-1500:]).decode("utf-8", errors="replace").strip()
            reason = f"{panic.group(0).decode(errors='replace')}; " if panic else ""
            return ExecutionResult("error", error=f"the VM ended without a result (exit status {outcome[0]}): "
                                   f"{reason}{tail}", duration_s=duration)
        try:
            frame = parse_result(written)
        except ValueError as err:
            return ExecutionResult("error", error=f"the VM's result ({len(written)} bytes from the {RESULT_PORT} "
                                   f"port) is damaged: {err}", duration_s=duration)
        result = interpret(frame["exit_code"], frame["signal"], frame["stdout"], frame["stderr"], frame["status"],
                           frame["truncated"], frame["duration"], timeout=limits.timeout)
        result.extra["in_guest_s"] = result.duration_s
        result.duration_s = duration  # the boot is part of the call's cost
        return result


def parse_result(data):
    """The outcome the guest wrote to the result port: one JSON object, its output in
    base64. ValueError naming the field or the byte offset where it is damaged."""
    frame = json.loads(data)
    if not isinstance(frame, dict):
        raise ValueError(f"expected a JSON object, got {type(frame).__name__}")
    missing = [key for key in RESULT_FIELDS if key not in frame]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for key in ("stdout", "stderr"):
        try:
            frame[key] = base64.b64decode(frame[key], validate=True)
        except (binascii.Error, TypeError) as err:
            raise ValueError(f"field {key} is not base64: {err}") from None
    return frame


class VMSubstrate(MicroVMSubstrate):
    """As ``microvm`` on a standard machine type (q35, virtio-pci, firmware): slower to
    boot, the devices of ordinary hardware."""

    name = "vm"
    machine = "q35"
    bus = "pci"
