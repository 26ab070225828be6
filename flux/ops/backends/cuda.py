"""CUDA kernels of flux._C (csrc/cuda/) for CUDA tensors.

The CUDA build provides routing metadata and route_profile natively; merged_moe runs its
grouped GEMMs in Triton (flux_kernels) over the CUDA routing metadata, since that is where the
Triton kernels win (see benchmarks/results for the measurement on a Hopper GPU).
"""
from __future__ import annotations

from flux._extension import has_cuda_kernels, load
from flux.ops.backends._native import moe_routing, quantize, dequantize, route_profile  # noqa: F401

DEVICES = ("cuda",)
_loaded, _why = load()
if not _loaded:
    UNAVAILABLE_REASON = _why
elif not has_cuda_kernels():
    UNAVAILABLE_REASON = "flux._C was built without CUDA kernels (CPU build of torch)"
else:
    UNAVAILABLE_REASON = None
