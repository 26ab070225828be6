"""Backend registry and selection.

A backend is a module that defines some of the functions of flux/ops/contracts.md.  The choice
is automatic by device (CPU: ``cpp``; CUDA: ``cuda`` for routing and route_profile, ``triton``
for merged_moe), and can be forced for every op with ``FLUX_BACKEND=reference|cpp|triton|cuda``
or, in code, with :func:`use_backend`.  Forcing a backend that cannot run an op on the given
device raises instead of silently falling back: a benchmark or test that asked for ``cpp`` must
measure ``cpp``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Iterator

BACKENDS = ("reference", "cpp", "cuda", "triton")
# The functions of flux/ops/contracts.md a backend may define.
OPS = ("quantize", "dequantize", "route_profile", "moe_routing", "merged_moe_fwd", "merged_moe_bwd")
# Preference order per device type when nothing is forced.
_AUTO = {
    "cpu": ("cpp", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
_local = threading.local()
_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}
_warned: set[str] = set()


def _load(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"flux.ops.backends.{name}")
            reason = getattr(_modules[name], "UNAVAILABLE_REASON", None)
            if reason:
                _errors[name] = reason
                _modules[name] = None
        except Exception as exc:  # ImportError, or a broken toolchain: report why, not crash
            _errors[name] = f"{type(exc).__name__}: {exc}"
            _modules[name] = None
    return _modules[name]


def availability() -> dict[str, str]:
    """{backend: "available" or the reason it is not}."""
    return {name: "available" if _load(name) is not None else _errors[name] for name in BACKENDS}


def forced_backend() -> str | None:
    name = getattr(_local, "forced", None) or os.environ.get("FLUX_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"FLUX_BACKEND={name!r} is not one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for every op called in this thread inside the block (None = automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    previous = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous


def _missing_native(name: str) -> None:
    """The compiled extension is part of the install: without it, say so loudly."""
    if os.environ.get("FLUX_REQUIRE_EXTENSION", "0") == "1":
        raise RuntimeError(f"FLUX_REQUIRE_EXTENSION=1 but backend {name!r} is unavailable: {_errors[name]}")
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"flux: backend {name!r} is unavailable ({_errors[name]}); using slower fallbacks. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def _supports(module: ModuleType, op: str, device_type: str) -> bool:
    devices = getattr(module, "DEVICES", ("cpu", "cuda"))
    return device_type in devices and callable(getattr(module, op, None))


def resolve(op: str, device_type: str) -> tuple[str, ModuleType]:
    """(backend name, module) that runs ``op`` for tensors on ``device_type``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if not isinstance(device_type, str):
        raise TypeError(f"device_type must be a str such as 'cpu' or 'cuda' (torch.device.type), got {device_type!r}")
    forced = forced_backend()
    if forced is not None:
        module = _load(forced)
        if module is None:
            raise RuntimeError(f"backend {forced!r} was requested but is unavailable: {_errors[forced]}")
        if not _supports(module, op, device_type):
            raise RuntimeError(f"backend {forced!r} has no {op} kernel for {device_type} tensors")
        return forced, module
    for name in _AUTO.get(device_type, ("reference",)):
        module = _load(name)
        if module is not None and _supports(module, op, device_type):
            return name, module
        if name in ("cpp", "cuda") and module is None:
            _missing_native(name)
    module = _load("reference")
    assert module is not None
    return "reference", module
