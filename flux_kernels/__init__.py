"""Triton kernels of flux (contracts: flux/ops/contracts.md; backend glue: flux/ops/backends/triton.py).

Modules: route_profile (fused router), grouped_gemm (grouped matmuls over sorted (token, group)
pairs), merged_moe (forward/backward launchers).  Set ``TRITON_INTERPRET=1`` before importing to
run the kernels on CPU tensors (slow; for tests).
"""
from flux_kernels.merged_moe import merged_moe_bwd, merged_moe_fwd
from flux_kernels.route_profile import route_profile

__all__ = ["route_profile", "merged_moe_fwd", "merged_moe_bwd"]
