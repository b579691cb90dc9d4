"""Milliseconds per tool call in each substrate: function, process, sandbox, microvm, vm.

    python benchmarks/tool_latency.py [--calls 3] [--substrates function,process,...]

Cold: the first call of a fresh substrate instance (for the VM substrates: the guest
build check, the KVM probe and the boot). Warm: the median of the later calls. No
substrate keeps a process or VM alive between calls, so a VM's warm call still boots
one. A substrate that cannot run here is reported with the reason.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

TOOL_MODULE = '''
def add(a, b):
    return a + b
'''


def measure(name, add, calls):
    from mlx_dsv4.agent import SubstrateUnavailable, Tool, make_substrate

    tool = Tool("add", "", {"type": "object"}, function=add)
    try:
        substrate = make_substrate(name)
    except SubstrateUnavailable as err:
        return None, str(err)
    times, extra = [], ""
    with substrate:
        for i in range(calls):
            start = time.perf_counter()
            result = substrate.run(tool, {"a": i, "b": 1})
            times.append((time.perf_counter() - start) * 1000)
            if not result.ok or result.value != i + 1:
                return None, f"call failed: {result.status}: {result.error}"
        if "accelerator" in result.extra:
            extra = result.extra["accelerator"]
    return times, extra


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--substrates", default="function,process,sandbox,microvm,vm")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "latency_tools.py").write_text(TOOL_MODULE)
        sys.path.insert(0, folder)
        import latency_tools

        rows = []
        for name in args.substrates.split(","):
            times, note = measure(name, latency_tools.add, args.calls)
            rows.append((name, times, note))
    print(f"{'substrate':<10} {'cold ms':>10} {'warm ms':>10}  note")
    for name, times, note in rows:
        if times is None:
            print(f"{name:<10} {'-':>10} {'-':>10}  {note[:90]}")
            continue
        warm = f"{statistics.median(times[1:]):10.1f}" if len(times) > 1 else f"{'-':>10}"
        print(f"{name:<10} {times[0]:10.1f} {warm}  {note}")


if __name__ == "__main__":
    main()
