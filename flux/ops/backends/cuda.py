"""CUDA kernels of flux._C (csrc/cuda/) for CUDA tensors.

The CUDA build provides routing metadata, route_profile and quantize natively; merged_moe runs
its grouped GEMMs in Triton (flux_kernels) over the CUDA routing metadata.  route_profile's
CUDA kernel keeps all experts of a token tile on chip, so it serves E <= 256; larger routers
go to the Triton kernel (or the reference one without Triton).
"""
from __future__ import annotations

from flux._extension import has_cuda_kernels, load
from flux.ops.backends import _native
from flux.ops.backends._native import dequantize, moe_routing, quantize  # noqa: F401

DEVICES = ("cuda",)
MAX_NATIVE_EXPERTS = 256
_loaded, _why = load()
if not _loaded:
    UNAVAILABLE_REASON = _why
elif not has_cuda_kernels():
    UNAVAILABLE_REASON = "flux._C was built without CUDA kernels (CPU build of torch)"
else:
    UNAVAILABLE_REASON = None


def route_profile(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts):
    if gate.shape[0] <= MAX_NATIVE_EXPERTS:
        return _native.route_profile(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts)
    try:
        from flux_kernels import route_profile as wide
    except ImportError:
        from flux.ops.backends.reference import route_profile as wide
    return wide(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts)
