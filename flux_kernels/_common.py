"""Shared switches and small device helpers of the Triton kernels.

``INTERPRET`` is read once at import: kernels defined while ``TRITON_INTERPRET=1`` run on CPU
tensors through the interpreter, where (measured with triton 3.x) bf16/fp16 arithmetic is wrong
and multi-config autotuning needs a CUDA ``do_bench``.  So in interpreter mode every kernel
converts its loads to fp32 right away (``CAST_F32``) and launches one fixed config; on CUDA the
matmul operands stay in their storage dtype (tensor cores) and a few configs are autotuned.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# fp32 operands: "ieee" keeps the contracts' fp32 semantics (torch's fp32 matmul does not use
# TF32 by default); "tf32x3" is near-fp32 at tensor-core speed, "tf32" is the fast inexact one.
FP32_DOT = os.environ.get("FLUX_TRITON_FP32_DOT", "ieee")


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for tl.dot on operands of ``dtype`` (only meaningful for fp32)."""
    return FP32_DOT if (dtype == torch.float32 or INTERPRET) else "tf32"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def act_fwd(gate, ACT: tl.constexpr):
    """f(gate) in fp32: ACT 0 = silu, 1 = exact-erf gelu."""
    if ACT == 0:
        out = gate / (1.0 + tl.exp(-gate))
    else:
        out = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    return out


@triton.jit
def act_fwd_bwd(gate, ACT: tl.constexpr):
    """(f(gate), f'(gate)) in fp32."""
    if ACT == 0:
        sig = 1.0 / (1.0 + tl.exp(-gate))
        f = gate * sig
        df = sig * (1.0 + gate * (1.0 - sig))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        f = gate * cdf
        df = cdf + gate * tl.exp(-0.5 * gate * gate) * 0.3989422804014327
    return f, df


_INTERPRET_C = tl.constexpr(INTERPRET)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even.  The interpreter's fp32->bf16 cast truncates
    (about 2x the rounding error of torch), so there the rounding is done on the bits."""
    if _INTERPRET_C and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out
