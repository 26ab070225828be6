"""Triton kernels (flux_kernels/) for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1.

Routing metadata comes from the pure-torch builder (no host synchronisation) when this backend
is forced; automatically, the CUDA build's native routing kernel is preferred.
"""
from __future__ import annotations

import os

from flux.ops.backends.reference import dequantize, moe_routing, quantize  # noqa: F401

UNAVAILABLE_REASON = None
DEVICES: tuple[str, ...] = ("cuda",)
try:
    import triton  # noqa: F401
except ImportError as exc:  # Triton is optional: flux imports and runs without it
    UNAVAILABLE_REASON = f"triton is not installed ({exc})"
else:
    if os.environ.get("TRITON_INTERPRET") == "1":
        DEVICES = ("cuda", "cpu")
    from flux_kernels import merged_moe_bwd, merged_moe_fwd, route_profile  # noqa: F401
