"""How much memory the machine offers, the wired-memory limit during generation, and the check
that a checkpoint fits before its weights are read.

On Metal, MLX can wire (pin) up to the device's recommended working-set size; generation runs
with that limit set, as mlx-lm does, so weights and cache stay resident. Elsewhere the limit
does not apply and the memory figures come from the operating system.
"""

import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .sizes import format_decimal_bytes

DEFAULT_CONTEXT = 32768


class MemoryFitError(ValueError):
    """The checkpoint's weights alone are larger than the machine's memory."""


class MemoryFitWarning(UserWarning):
    """Weights plus cache for the requested context exceed what the machine can keep resident."""


@dataclass
class MachineMemory:
    total: int  # physical memory (Metal: the device's memory size)
    workable: int  # what can be kept resident (Metal: recommended working set; else available memory)
    source: str


def _metal_info() -> Optional[dict]:
    if not mx.metal.is_available():
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return info if "max_recommended_working_set_size" in info else None


def _meminfo() -> dict:
    values = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def machine_memory() -> MachineMemory:
    info = _metal_info()
    if info is not None:
        return MachineMemory(int(info["memory_size"]), int(info["max_recommended_working_set_size"]),
                             "Metal recommended working set")
    meminfo = _meminfo()
    if "MemTotal" in meminfo:
        return MachineMemory(meminfo["MemTotal"], meminfo.get("MemAvailable", meminfo["MemTotal"]),
                             "available system memory")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return MachineMemory(total, total, "system memory")


def fitting_recipe(config: dict, budget: int, context: int) -> Optional[str]:
    """The largest recipe of the converter's size table whose weights plus FP8 cache at ``context``
    tokens plus prefill transient (``memory.run_bytes``) fit ``budget`` bytes, as ``--recipe ...``
    text; None when none fits."""
    from .convert.estimate import TABLE_RECIPES, estimate_config
    from .convert.recipes import Recipe
    from .memory import run_bytes

    fitting = []
    for label, kwargs in TABLE_RECIPES:
        estimate = estimate_config(config, Recipe(**kwargs), context, include_mtp=False)
        if run_bytes(config, context, estimate.model_bytes) <= budget:
            fitting.append((estimate.model_bytes, label))
    return f"--recipe {max(fitting)[1]}" if fitting else None


def check_fit(config: dict, weight_bytes: int, where: str, context: int = DEFAULT_CONTEXT) -> None:
    """Raise ``MemoryFitError`` when the weights exceed the machine's memory; warn
    (``MemoryFitWarning``) when weights + FP8 cache at ``context`` tokens + the prefill transient
    (``memory.run_bytes``) exceed what it keeps resident."""
    from .memory import PREFILL_CHUNK, kv_bytes, run_bytes

    memory = machine_memory()
    need = run_bytes(config, context, weight_bytes)
    cache = kv_bytes(config, context)
    transient = need - weight_bytes - cache
    if weight_bytes <= memory.total and need <= memory.workable:
        return
    recipe = fitting_recipe(config, memory.workable, context)
    advice = (f"`mlx-dsv4 convert {recipe}` would fit" if recipe else "no converter recipe fits this machine")
    if weight_bytes > memory.total:
        raise MemoryFitError(f"{where}: weights are {format_decimal_bytes(weight_bytes)}, more than this machine's "
                             f"{format_decimal_bytes(memory.total)} of memory; {advice}")
    warnings.warn(f"{where}: weights {format_decimal_bytes(weight_bytes)} + FP8 cache for {context} tokens "
                  f"{format_decimal_bytes(cache)} + prefill transient ({PREFILL_CHUNK}-token chunks) "
                  f"{format_decimal_bytes(transient)} exceed the {format_decimal_bytes(memory.workable)} of "
                  f"{memory.source}: expect swapping; {advice}", MemoryFitWarning, stacklevel=3)


_wired = {"depth": 0, "previous": 0}
_wired_lock = threading.Lock()


def model_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def auto_kv_limit(model) -> int:
    """The KV memory guard "auto": what the machine can keep resident, minus the weights and
    1 GiB for the runtime (at least 1 MiB)."""
    return max(machine_memory().workable - model_bytes(model) - (1 << 30), 1 << 20)


@contextmanager
def wired_limit(model=None):
    """Run the body with MLX's wired limit at the Metal device's recommended working-set size,
    then restore the previous limit. Nested and concurrent uses share one setting, restored when
    the last one ends. Warns when the model is larger than what can be wired. No-op off Metal."""
    info = _metal_info()
    if info is None:
        yield
        return
    limit = int(info["max_recommended_working_set_size"])
    with _wired_lock:
        if _wired["depth"] == 0:
            if model is not None and model_bytes(model) > 0.9 * limit:
                warnings.warn(f"the model ({format_decimal_bytes(model_bytes(model))}) is close to or over the "
                              f"{format_decimal_bytes(limit)} that can be wired: generation may be slow",
                              MemoryFitWarning, stacklevel=3)
            _wired["previous"] = mx.set_wired_limit(limit)
        _wired["depth"] += 1
    try:
        yield
    finally:
        with _wired_lock:
            _wired["depth"] -= 1
            if _wired["depth"] == 0:
                mx.synchronize()
                mx.set_wired_limit(_wired["previous"])
