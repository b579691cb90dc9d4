"""mlx-lm modules without mlx-lm's package import.

``import mlx_lm.sample_utils`` first runs ``mlx_lm/__init__.py``, which imports mlx-lm's
converter and loader and through them transformers (and torch, when installed): seconds
of start-up for modules that need only mlx. ``import_mlx_lm`` returns the mlx-lm module
itself when ``mlx_lm`` is already imported (its classes keep their identity); otherwise
it loads mlx-lm's own files under a private package name whose ``__path__`` is mlx-lm's
directory, so their relative imports resolve to mlx-lm's files and its ``__init__``
never runs.
"""

import importlib
import importlib.util
import sys
import types

ALIAS = "mlx_dsv4._mlx_lm"


def _alias_package() -> types.ModuleType:
    package = sys.modules.get(ALIAS)
    if package is None:
        spec = importlib.util.find_spec("mlx_lm")  # locates the package without running it
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("mlx-lm is not installed: pip install mlx-lm", name="mlx_lm")
        package = types.ModuleType(ALIAS, "mlx-lm's files, loaded without mlx_lm/__init__.py")
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = ALIAS
        sys.modules[ALIAS] = package
    return package


def import_mlx_lm(name: str) -> types.ModuleType:
    """The module ``mlx_lm.<name>`` (e.g. ``"sample_utils"``, ``"models.switch_layers"``)."""
    if "mlx_lm" in sys.modules:
        return importlib.import_module(f"mlx_lm.{name}")
    _alias_package()
    return importlib.import_module(f"{ALIAS}.{name}")
