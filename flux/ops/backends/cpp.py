"""C++/OpenMP kernels of flux._C (csrc/cpu/) for CPU tensors."""
from flux.ops.backends._native import (  # noqa: F401
    UNAVAILABLE_REASON,
    dequantize,
    merged_moe_bwd,
    merged_moe_fwd,
    moe_routing,
    quantize,
    route_profile,
)

DEVICES = ("cpu",)
