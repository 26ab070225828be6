"""FLUX kernels: quantize, route_profile, merged_moe (contracts in flux/ops/contracts.md)."""
from flux.ops.api import merged_moe, quantize, route_profile
from flux.ops.backends import availability, resolve, use_backend
from flux.ops.quantized import QuantizedTensor

__all__ = [
    "QuantizedTensor",
    "availability",
    "merged_moe",
    "quantize",
    "resolve",
    "route_profile",
    "use_backend",
]
