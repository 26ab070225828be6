"""Loading of the compiled extension ``flux._C`` (torch must be imported first)."""
from __future__ import annotations

import importlib

import torch

_state: dict[str, object] = {}


def load() -> tuple[bool, str]:
    """(loaded, reason if not).  Loads flux._C once; registers the torch.ops.flux_C ops."""
    if "ok" not in _state:
        try:
            importlib.import_module("flux._C")
            _state["ok"], _state["why"] = True, ""
        except ImportError as exc:
            _state["ok"] = False
            _state["why"] = (
                f"flux._C is not built ({exc}); install with "
                "`pip install --no-build-isolation -e .`"
            )
    return bool(_state["ok"]), str(_state["why"])


def has_cuda_kernels() -> bool:
    """True when flux._C was built with its CUDA kernels (a CUDA build of torch)."""
    return load()[0] and torch._C._dispatch_has_kernel_for_dispatch_key(
        "flux_C::route_profile", "CUDA"
    )
