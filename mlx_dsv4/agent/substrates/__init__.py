"""Where tools run: ``function`` (in-process), ``process`` (child process with limits),
``sandbox`` (process limits plus no network and a private filesystem view) and
``container`` (docker or podman)."""

from .base import ExecutionResult, Substrate, SubstrateUnavailable
from .container import ContainerSubstrate
from .function import FunctionSubstrate
from .process import Limits, ProcessSubstrate
from .sandbox import SandboxSubstrate

SUBSTRATES = {
    "function": FunctionSubstrate,
    "process": ProcessSubstrate,
    "sandbox": SandboxSubstrate,
    "container": ContainerSubstrate,
}


def make_substrate(substrate, **options):
    """A substrate instance from a name (with constructor ``options``) or an instance."""
    if isinstance(substrate, Substrate):
        return substrate
    try:
        kind = SUBSTRATES[substrate]
    except (KeyError, TypeError):
        raise ValueError(f"unknown substrate {substrate!r}; choose one of {sorted(SUBSTRATES)}") from None
    return kind(**options)


__all__ = [
    "ContainerSubstrate",
    "ExecutionResult",
    "FunctionSubstrate",
    "Limits",
    "ProcessSubstrate",
    "SandboxSubstrate",
    "Substrate",
    "SubstrateUnavailable",
    "SUBSTRATES",
    "make_substrate",
]
