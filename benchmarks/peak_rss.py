"""Code that the RSS benchmarks run first in their child process: `base` is the resident memory
right after the imports (on Linux the imports' transient peak is cleared, so only what follows
counts), and `peak()` the high-water mark since then."""

PRELUDE = r"""
import json, os, resource, sys

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def maxrss():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024

linux = os.path.exists("/proc/self/clear_refs")
if linux:
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
else:
    base = maxrss()

def peak():
    return status("VmHWM") if linux else maxrss()
"""
