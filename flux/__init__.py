"""FLUX: federated fine-tuning of Mixture-of-Experts language models on small accelerators.

The top-level names are imported on first use (PEP 562), so ``import flux.<submodule>`` loads
only what it needs: a config is checked without torch, and ``python -m flux.env`` runs its module
once (importing it from here first made runpy warn).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "ops": ("flux.ops", None),
    "env_report": ("flux.env", "env_report"),
    "patch": ("flux.moe", "patch"),
    "unpatch": ("flux.moe", "unpatch"),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'flux' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
