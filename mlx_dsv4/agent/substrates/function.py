"""``function``: the tool runs in this process. For trusted tools only: it has no limits."""

import time
import traceback

from .base import ExecutionResult, Substrate, interpret_command, run_child


class FunctionSubstrate(Substrate):
    """Calls Python tools directly; command tools run as plain child processes with only
    a wall-clock ``timeout`` and an ``output_bytes`` cap."""

    name = "function"

    def __init__(self, *, timeout=60.0, output_bytes=64 << 10):
        self.timeout = timeout
        self.output_bytes = output_bytes

    def run_function(self, function, arguments):
        start = time.perf_counter()
        try:
            value = function(**arguments)
        except Exception as err:  # noqa: BLE001 - reported to the model
            where = traceback.extract_tb(err.__traceback__)[-1]
            return ExecutionResult(
                "error",
                error=f"{type(err).__name__}: {err} (at {where.name}, line {where.lineno})",
                duration_s=time.perf_counter() - start,
            )
        return ExecutionResult("ok", value=value, duration_s=time.perf_counter() - start)

    def run_command(self, argv):
        outcome = run_child([str(a) for a in argv], timeout=self.timeout, output_bytes=self.output_bytes)
        return interpret_command(*outcome, timeout=self.timeout)
