"""Where tools run: ``function`` (in-process), ``process`` (child process with limits),
``sandbox`` (process limits plus no network and a private filesystem view),
``container`` (docker or podman), ``microvm`` and ``vm`` (a fresh QEMU guest per call).

Policy by declared risk: a tool declared ``isolation="trusted"`` runs in ``function``,
``isolation="untrusted"`` in ``microvm`` (``RISK_POLICY``); any substrate name works too."""

from .base import ExecutionResult, Substrate, SubstrateUnavailable
from .container import ContainerSubstrate
from .function import FunctionSubstrate
from .process import Limits, ProcessSubstrate
from .sandbox import SandboxSubstrate
from .vm import MicroVMSubstrate, VMSubstrate

SUBSTRATES = {
    "function": FunctionSubstrate,
    "process": ProcessSubstrate,
    "sandbox": SandboxSubstrate,
    "container": ContainerSubstrate,
    "microvm": MicroVMSubstrate,
    "vm": VMSubstrate,
}
RISK_POLICY = {"trusted": "function", "untrusted": "microvm"}


def make_substrate(substrate, **options):
    """A substrate instance from a name, a risk level of ``RISK_POLICY`` (with
    constructor ``options``) or an instance."""
    if isinstance(substrate, Substrate):
        return substrate
    if isinstance(substrate, str):
        substrate = RISK_POLICY.get(substrate, substrate)
    try:
        kind = SUBSTRATES[substrate]
    except (KeyError, TypeError):
        raise ValueError(f"unknown substrate {substrate!r}; choose one of {sorted(SUBSTRATES)} "
                         f"or a risk level ({', '.join(RISK_POLICY)})") from None
    return kind(**options)


__all__ = [
    "ContainerSubstrate",
    "ExecutionResult",
    "FunctionSubstrate",
    "Limits",
    "MicroVMSubstrate",
    "RISK_POLICY",
    "ProcessSubstrate",
    "SandboxSubstrate",
    "Substrate",
    "SubstrateUnavailable",
    "SUBSTRATES",
    "VMSubstrate",
    "make_substrate",
]
