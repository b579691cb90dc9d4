"""The Linux guest of the ``microvm`` and ``vm`` substrates: a distribution kernel and an
initramfs (newc cpio) holding a static busybox, the host's Python with its standard
library, the kernel modules for virtio and 9p, and a small ``/init``.

Built at first use from distribution packages, cached under
``$XDG_CACHE_HOME/mlx-dsv4/vm-guest/<key>`` (``~/.cache`` without XDG_CACHE_HOME), where
``key`` hashes every input; a changed input gives a new key and a rebuild.

    python -m mlx_dsv4.agent.substrates.guest build    # build (or find) and print the paths

Kernel: ``MLX_DSV4_VM_KERNEL`` (a vmlinuz whose modules are in ``/lib/modules/<release>``
or given by ``MLX_DSV4_VM_MODULES``), else ``/boot/vmlinuz-*`` with its modules, else
Debian's ``linux-image-amd64`` fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x``. Busybox: ``/bin/busybox`` (Debian's busybox-static) or ``MLX_DSV4_VM_BUSYBOX``.
"""

import argparse
import glob
import hashlib
import importlib.util
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

FORMAT = 2

# virtio transports (mmio for microvm, pci for q35), 9p for the tool share, virtio-fs for
# vfkit, the virtio console (the result port; vfkit's console), the network driver for
# tools that declare network.
WANTED_MODULES = (
    "virtio_mmio", "virtio_pci", "9pnet_virtio", "9p", "virtio_console", "virtiofs", "virtio_net",
)

# Standard-library parts a tool does not need in a guest (tests, GUIs, installers).
STDLIB_SKIP = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip",
    "lib2to3", "pydoc_data", "distutils", "__pycache__", "venv", "__phello__",
}
DYNLOAD_SKIP = re.compile(r"^(_tkinter|_curses|_curses_panel|readline|_dbm|_gdbm|nis|_ctypes_test|_test|xxlimited|xxsubtype|_xxtestfuzz)")

INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in $(cat /modules.order); do insmod /modules/$module 2>/dev/null; done
cmdline=$(cat /proc/cmdline)
console=ttyS0
share=9p
for word in $cmdline; do
  case $word in
    mlx.console=*) console=${word#mlx.console=} ;;
    mlx.share=*) share=${word#mlx.share=} ;;
    mlx.result=*) result_port=${word#mlx.result=} ;;
    mlx.net=1) net=1 ;;
  esac
done
mkdir -p /tool /work /tmp
if [ "$share" = virtiofs ]; then
  mount -t virtiofs -o ro tool /tool
else
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose tool /tool
fi
mount -t tmpfs -o mode=1777,size=64m work /work
mount -t tmpfs -o mode=1777,size=16m tmp /tmp
ip link set lo up
if [ -n "$net" ]; then
  ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
  echo "nameserver 10.0.2.3" > /etc/resolv.conf
fi
# The outcome goes to its own virtio port, writable by root only: a tool (nobody) that
# writes to the console cannot pass for the result.
result=
if [ -f /tool/guest_main.py ]; then
  case $result_port in
    org.*)
      tries=0
      while [ -z "$result" ] && [ $tries -lt 50 ]; do
        for port in /sys/class/virtio-ports/*; do
          if [ "$(cat $port/name 2>/dev/null)" = "$result_port" ]; then
            result=/dev/${port##*/}
            [ -c $result ] || mknod $result c $(tr ':' ' ' < $port/dev)
          fi
        done
        [ -n "$result" ] || { tries=$((tries + 1)); sleep 0.1; }
      done ;;
    ?*) [ -c /dev/$result_port ] && result=/dev/$result_port ;;
  esac
  if [ -n "$result" ]; then
    chown 0:0 $result
    chmod 0600 $result
  fi
fi
export LD_LIBRARY_PATH=$(cat /py/library_path)
if [ -f /tool/guest_main.py ] && [ -z "$result" ]; then
  echo "mlx-dsv4 guest: no result port $result_port" > /dev/$console
elif [ -f /tool/guest_main.py ]; then
  PYTHONHOME=/py /py/bin/python3 -I -S /tool/guest_main.py $result
else
  echo "mlx-dsv4 guest: no tool share" > /dev/$console
fi
sync
reboot -f
"""


@dataclass(frozen=True)
class Guest:
    """A built guest: boot ``kernel`` (uncompressed, booted through PVH, where it could be
    unpacked; else the bzImage) with ``initramfs``."""

    kernel: str
    initramfs: str
    key: str
    python_version: str


class GuestBuildError(RuntimeError):
    """The guest cannot be built on this machine (the message says what is missing)."""


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx-dsv4" / "vm-guest"


def _say(progress, text):
    if progress:
        print(f"[guest] {text}", file=sys.stderr, flush=True)


def _sha256_file(path, digest=None):
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


# -- kernel --------------------------------------------------------------------------


def _debian_kernel(progress):
    """(vmlinuz, modules root) of Debian's current amd64 kernel, downloaded once."""
    downloads = cache_dir() / "downloads"
    depends = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True)
    match = re.search(r"Depends:\s*(linux-image-\S+-amd64)", depends.stdout)
    if match is None:
        raise GuestBuildError(
            "no kernel for the VM guest: no /boot/vmlinuz-*, MLX_DSV4_VM_KERNEL is not set, and apt-cache "
            f"does not know linux-image-amd64 ({(depends.stderr or depends.stdout).strip()[:200]!r})")
    package = match.group(1)
    unpacked = downloads / package
    if not (unpacked / "done").exists():
        downloads.mkdir(parents=True, exist_ok=True)
        _say(progress, f"downloading {package} with apt-get download")
        with tempfile.TemporaryDirectory(dir=downloads) as scratch:
            got = subprocess.run(["apt-get", "download", package], cwd=scratch, capture_output=True, text=True)
            debs = glob.glob(os.path.join(scratch, "*.deb"))
            if got.returncode != 0 or not debs:
                raise GuestBuildError(f"apt-get download {package} failed: {got.stderr.strip()[-400:]}")
            _say(progress, f"unpacking {os.path.basename(debs[0])}")
            shutil.rmtree(unpacked, ignore_errors=True)
            done = subprocess.run(["dpkg-deb", "-x", debs[0], str(unpacked)], capture_output=True, text=True)
            if done.returncode != 0:
                raise GuestBuildError(f"dpkg-deb -x {debs[0]} failed: {done.stderr.strip()[-400:]}")
        (unpacked / "done").write_text(package)
    kernels = sorted(glob.glob(str(unpacked / "boot" / "vmlinuz-*")))
    if not kernels:
        raise GuestBuildError(f"{package} holds no boot/vmlinuz-*")
    release = os.path.basename(kernels[-1])[len("vmlinuz-"):]
    return kernels[-1], str(unpacked / "lib" / "modules" / release)


def find_kernel(progress=True):
    """(vmlinuz path, its modules directory)."""
    given = os.environ.get("MLX_DSV4_VM_KERNEL")
    if given:
        release = os.path.basename(given)[len("vmlinuz-"):] if os.path.basename(given).startswith("vmlinuz-") else ""
        modules = os.environ.get("MLX_DSV4_VM_MODULES") or f"/lib/modules/{release}"
        if not os.path.isfile(given):
            raise GuestBuildError(f"MLX_DSV4_VM_KERNEL={given}: no such file")
        return given, modules
    for kernel in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        release = os.path.basename(kernel)[len("vmlinuz-"):]
        if os.access(kernel, os.R_OK) and os.path.isfile(f"/lib/modules/{release}/modules.dep"):
            return kernel, f"/lib/modules/{release}"
    return _debian_kernel(progress)


def _write_modules_dep(modules_root, dep_file):
    """modules.dep as depmod writes it, from each module's ``depends=`` field (an
    unpacked kernel package has none: depmod runs at installation)."""
    paths, needs = {}, {}
    for path in sorted(glob.glob(os.path.join(modules_root, "kernel", "**", "*.ko"), recursive=True)):
        rel = os.path.relpath(path, modules_root)
        name = os.path.basename(rel)[:-3].replace("-", "_")
        paths[name] = rel
        match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", Path(path).read_bytes())
        needs[rel] = [d.replace("-", "_") for d in match.group(1).decode().split(",") if d] if match else []
    with open(dep_file + ".tmp", "w") as f:
        for rel, dependencies in needs.items():
            f.write(f"{rel}: {' '.join(paths[d] for d in dependencies if d in paths)}\n".replace(" \n", "\n"))
    os.replace(dep_file + ".tmp", dep_file)


def uncompressed_kernel(bzimage):
    """The ELF kernel inside a bzImage (xz or gzip), or None. QEMU boots it directly (PVH)
    and skips the decompression, which takes seconds when emulated (TCG)."""
    data = Path(bzimage).read_bytes()
    formats = (
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), lzma.LZMAError),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), zlib.error),
    )
    for magic, decompressor, failure in formats:
        start = data.find(magic)
        while start != -1:
            try:
                out = decompressor().decompress(data[start:])
            except (failure, EOFError):
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            start = data.find(magic, start + 1)
    return None


def module_files(modules_root, wanted=WANTED_MODULES):
    """Module paths (relative to ``modules_root``) for ``wanted``, dependencies first.
    Built-in or absent modules are left out (the guest then goes without them)."""
    dep_file = os.path.join(modules_root, "modules.dep")
    if not os.path.isfile(dep_file):
        if not os.path.isdir(os.path.join(modules_root, "kernel")):
            raise GuestBuildError(f"{modules_root} holds no kernel modules (no modules.dep, no kernel/)")
        _write_modules_dep(modules_root, dep_file)
    depends, by_name = {}, {}
    with open(dep_file) as f:
        for line in f:
            path, _, rest = line.partition(":")
            depends[path] = rest.split()
            name = os.path.basename(path).split(".ko")[0].replace("-", "_")
            by_name[name] = path
    ordered = []

    def visit(path):
        for dependency in depends.get(path, []):
            visit(dependency)
        if path not in ordered:
            ordered.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is not None:
            visit(path)
    return ordered


# -- python --------------------------------------------------------------------------


def _shared_libraries(binaries):
    """Absolute paths of the shared libraries ``binaries`` load, from ldd."""
    found = set()
    for binary in binaries:
        done = subprocess.run(["ldd", binary], capture_output=True, text=True)
        for line in done.stdout.splitlines():
            match = re.search(r"(/\S+)\s+\(0x", line)
            if match and "not found" not in line:
                found.add(match.group(1))
    return sorted(found)


def python_parts():
    """(interpreter, stdlib dir, dynload dir, version) of the Python this process runs."""
    interpreter = os.path.realpath(os.path.join(sys.base_exec_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}"))
    if not os.path.isfile(interpreter):
        interpreter = os.path.realpath(sys.executable)
    stdlib = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})["stdlib"]
    dynload = os.path.join(stdlib, "lib-dynload")
    return interpreter, stdlib, dynload, f"{sys.version_info[0]}.{sys.version_info[1]}"


def _stdlib_files(stdlib):
    files = []
    for root, dirs, names in os.walk(stdlib):
        rel_root = os.path.relpath(root, stdlib)
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP and not d.startswith("config-")
                         and not (rel_root == "." and d == "lib-dynload"))
        for name in sorted(names):
            if name.endswith(".py"):
                files.append(os.path.join(root, name))
    return files


def _dynload_files(dynload):
    return sorted(p for p in glob.glob(os.path.join(dynload, "*.so")) if not DYNLOAD_SKIP.match(os.path.basename(p)))


# -- cpio ----------------------------------------------------------------------------


class Cpio:
    """A newc archive written entry by entry (the kernel unpacks it as the root)."""

    def __init__(self, stream):
        self.stream = stream
        self.inode = 300000
        self.written = 0

    def _entry(self, name, mode, data=b"", nlink=1):
        self.inode += 1
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08X}" for v in (
            self.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0))
        out = header.encode() + encoded
        out += b"\0" * (-len(out) % 4)
        out += data + b"\0" * (-len(data) % 4)
        self.stream.write(out)
        self.written += len(out)

    def directory(self, name):
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name, data, mode=0o644):
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def node(self, name, kind, major, minor):
        self.inode += 1
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08X}" for v in (
            self.inode, kind | 0o600, 0, 0, 1, 0, 0, 0, 0, major, minor, len(encoded), 0))
        out = header.encode() + encoded
        out += b"\0" * (-len(out) % 4)
        self.stream.write(out)
        self.written += len(out)

    def close(self):
        self._entry("TRAILER!!!", 0)
        self.stream.write(b"\0" * (-self.written % 512))


def _binary(path):
    """The bytes of an ELF file without its debug sections (where ``strip`` exists)."""
    tool = shutil.which("strip")
    if tool is None:
        return Path(path).read_bytes()
    with tempfile.TemporaryDirectory() as scratch:
        copy = os.path.join(scratch, "binary")
        done = subprocess.run([tool, "--strip-debug", "-o", copy, path], capture_output=True)
        return Path(copy if done.returncode == 0 else path).read_bytes()


def _busybox():
    path = os.environ.get("MLX_DSV4_VM_BUSYBOX") or "/bin/busybox"
    if not os.path.isfile(path):
        raise GuestBuildError(f"{path} is missing: install busybox-static (apt-get install busybox-static)")
    done = subprocess.run(["ldd", path], capture_output=True, text=True)
    if "=>" in done.stdout:
        raise GuestBuildError(f"{path} is linked dynamically; the guest needs a static busybox (busybox-static)")
    applets = subprocess.run([path, "--list"], capture_output=True, text=True).stdout.split()
    return path, applets


def inputs(progress=True):
    """Everything the guest is built from, and the key hashing it."""
    busybox, applets = _busybox()
    kernel, modules_root = find_kernel(progress)
    modules = module_files(modules_root)
    interpreter, stdlib, dynload, version = python_parts()
    dynloads = _dynload_files(dynload)
    libraries = _shared_libraries([interpreter, *dynloads])
    stdlib_files = _stdlib_files(stdlib)
    digest = hashlib.sha256(f"format {FORMAT}\n{INIT}\n{version}\n".encode())
    for path in [kernel, busybox, interpreter, *libraries, *dynloads]:
        digest.update(path.encode())
        _sha256_file(path, digest)
    for path in [*(os.path.join(modules_root, m) for m in modules), *stdlib_files]:
        info = os.stat(path)
        digest.update(f"{path} {info.st_size} {info.st_mtime_ns}\n".encode())
    return {
        "kernel": kernel, "modules_root": modules_root, "modules": modules, "busybox": busybox,
        "applets": applets, "interpreter": interpreter, "stdlib": stdlib, "stdlib_files": stdlib_files,
        "dynloads": dynloads, "libraries": libraries, "version": version, "key": digest.hexdigest()[:24],
    }


def _stdlib_zip(stdlib, files):
    """The pure-Python standard library as bytecode in a zip (found through pythonXY.zip)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for path in files:
            rel = os.path.relpath(path, stdlib)
            cached = importlib.util.cache_from_source(path)
            try:
                fresh = os.stat(cached).st_mtime >= os.stat(path).st_mtime
            except OSError:
                fresh = False
            if fresh:
                archive.write(cached, rel + "c")
            else:
                archive.write(path, rel)
    return buffer.getvalue()


def build(progress=True, force=False):
    """The guest for this machine's inputs: built now unless cached."""
    found = inputs(progress)
    target = cache_dir() / found["key"]
    manifest = target / "guest.json"
    if manifest.exists() and not force:
        data = json.loads(manifest.read_text())
        return Guest(str(target / data["boot_kernel"]), str(target / "initramfs.cpio"), found["key"],
                     data["python_version"])
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{found['key']}-", dir=target.parent))
    try:
        _say(progress, f"building the VM guest in {target}")
        shutil.copyfile(found["kernel"], scratch / "vmlinuz")
        elf = uncompressed_kernel(found["kernel"])
        if elf is not None:
            _say(progress, f"kernel unpacked for direct boot ({len(elf) / 1e6:.0f} MB)")
            (scratch / "vmlinux").write_bytes(elf)
        version = found["version"]
        with open(scratch / "initramfs.cpio", "wb") as stream:
            archive = Cpio(stream)
            for directory in ("bin", "dev", "proc", "sys", "tmp", "tool", "work", "etc", "modules", "py", "py/bin",
                              "py/lib", f"py/lib/python{version}", f"py/lib/python{version}/lib-dynload"):
                archive.directory(directory)
            archive.node("dev/console", stat.S_IFCHR, 5, 1)
            archive.file("init", INIT.encode(), 0o755)
            archive.file("bin/busybox", Path(found["busybox"]).read_bytes(), 0o755)
            for applet in found["applets"]:
                if applet not in ("busybox",) and "/" not in applet:
                    archive.symlink(f"bin/{applet}", "busybox")
            archive.file("etc/passwd", b"root:x:0:0:root:/work:/bin/sh\nnobody:x:65534:65534:nobody:/work:/bin/sh\n")
            archive.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
            _say(progress, f"kernel modules: {len(found['modules'])}")
            names = []
            for module in found["modules"]:
                name = os.path.basename(module)
                names.append(name)
                archive.file(f"modules/{name}", Path(found["modules_root"], module).read_bytes())
            archive.file("modules.order", ("\n".join(names) + "\n").encode())
            _say(progress, f"python {version}: interpreter and {len(found['libraries'])} shared libraries")
            archive.file("py/bin/python3", _binary(found["interpreter"]), 0o755)
            made = {"py", "py/bin", "py/lib", "bin", "etc"}
            for library in found["libraries"]:
                inside = library.lstrip("/")
                parts = inside.split("/")
                for i in range(1, len(parts)):
                    parent = "/".join(parts[:i])
                    if parent not in made:
                        made.add(parent)
                        archive.directory(parent)
                archive.file(inside, _binary(library), 0o755)
            archive.file("py/library_path", ":".join(sorted({os.path.dirname(p) for p in found["libraries"]})).encode())
            for path in found["dynloads"]:
                archive.file(f"py/lib/python{version}/lib-dynload/{os.path.basename(path)}", _binary(path), 0o755)
            _say(progress, f"standard library: {len(found['stdlib_files'])} modules as bytecode")
            archive.file(f"py/lib/python{version.replace('.', '')}.zip", _stdlib_zip(found["stdlib"], found["stdlib_files"]))
            # The interpreter looks for os.py under PYTHONHOME to confirm its prefix.
            archive.file(f"py/lib/python{version}/os.py", Path(found["stdlib"], "os.py").read_bytes())
            archive.close()
        (scratch / "guest.json").write_text(json.dumps({
            "key": found["key"], "kernel": found["kernel"], "python_version": version,
            "boot_kernel": "vmlinux" if elf is not None else "vmlinuz",
            "modules": found["modules"], "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for stale in target.parent.iterdir():
        if stale.name != found["key"] and stale.name != "downloads" and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)
    size = os.path.getsize(target / "initramfs.cpio")
    _say(progress, f"done in {time.perf_counter() - started:.1f} s (initramfs {size / 1e6:.1f} MB)")
    return Guest(str(target / ("vmlinux" if elf is not None else "vmlinuz")), str(target / "initramfs.cpio"),
                 found["key"], version)


_built = {}


def guest(progress=True):
    """The cached guest, built on first use in this process."""
    if "guest" not in _built:
        _built["guest"] = build(progress)
    return _built["guest"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mlx_dsv4.agent.substrates.guest",
                                     description="Build the Linux guest of the microvm and vm substrates.")
    parser.add_argument("command", choices=["build", "path"])
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached guest matches")
    args = parser.parse_args(argv)
    try:
        built = build(progress=args.command == "build", force=args.force)
    except GuestBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"kernel": built.kernel, "initramfs": built.initramfs, "key": built.key}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
