"""Public ops: argument checking and packing around the custom ops of flux.ops.library.

The checks that only need types are done here (a bool where an int is expected, a QuantizedTensor
whose fields went stale); the tensor metadata checks live with each custom op
(``library.check_*``, run by the op and by its fake kernel, so also under torch.compile) and the
checks that read index values run inside the op on CPU tensors.  Every message names the
argument (flux/ops/checks.py).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

from flux.ops import library
from flux.ops.checks import FLOAT_DTYPES, INDEX_DTYPES, check_bool, check_choice, check_int, check_tensor, describe
from flux.ops.library import ACTIVATIONS, SCORINGS, _check_bits
from flux.ops.quantized import QuantizedTensor

WeightStack = Union[Tensor, QuantizedTensor]


def quantize(w: Tensor, bits: int = 4, group_size: int = 64) -> QuantizedTensor:
    """Symmetric per-group integer quantization of the last dim of ``w``.

    Args:
        w: float tensor [..., C] (fp32/bf16/fp16/fp64, computed in fp32), at least 1-D; it may be
            empty (R = 0 rows or C = 0 columns give empty qdata / scales).
        bits: 4 (two values packed per byte) or 8.
        group_size: consecutive elements of the last dim sharing one fp32 scale, an int >= 1
            (not a bool); the last group of a row may be partial.

    Returns:
        A :class:`QuantizedTensor`; ``.dequantize()`` is within ``scale / 2`` of ``w``
        elementwise, ``scale = absmax(group) / (7 or 127)``.  A group holding NaN or Inf
        dequantizes to NaN (contracts.md, NaN and Inf).
    """
    check_tensor(w, "w", FLOAT_DTYPES, layout="[..., C]")
    if w.dim() < 1:
        raise ValueError("w must have at least 1 dim [..., C], got a 0-D tensor")
    bits = _check_bits(bits)
    group_size = check_int(group_size, "group_size", lo=1, hi=2**31 - 1)
    # An explicit row count: reshape(-1, 0) is ambiguous for C = 0.
    rows = w.detach().reshape(math.prod(w.shape[:-1]), w.shape[-1]).contiguous()
    if rows.dtype == torch.float64:
        rows = rows.float()
    qdata, scales = library.quantize_rows(rows, bits, group_size)
    return QuantizedTensor(qdata, scales, bits, group_size, w.shape, w.dtype)


def route_profile(
    x: Tensor,
    gate: WeightStack,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    counts: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused router: gate matmul (int4/int8 gate dequantized on the fly), scoring, top-k, and a
    per-expert activation histogram, in one pass over ``x``.

    Args:
        x: hidden states [T, H], fp32/bf16/fp16/fp64 (T may be 0; fp64 is computed in fp32).
        gate: router weight [E, H] (E >= 1), dense float or a 2-D :class:`QuantizedTensor`.
        top_k: experts per token, an int (not a bool) with 1 <= top_k <= E.
        scoring: "softmax" (over all E) or "sigmoid".
        renormalize: a bool: divide the k weights of a token by their sum.
        counts: optional contiguous int64 [E] on x's device, accumulated in place (profiling
            over many batches).

    Returns:
        (topk_weights fp32 [T, k], topk_ids int32 [T, k], counts int64 [E]).  Ids are in
        descending logit order; ties go to the lower expert index; a NaN logit ranks above every
        number (as in torch.topk).  The op is forward-only: the returned weights carry no
        gradient to x or the gate (use the model's router for a differentiable routing path).
    """
    check_tensor(x, "x", FLOAT_DTYPES, dim=2, layout="[T, H]")
    if isinstance(gate, QuantizedTensor):
        gate.validate("gate")
        if len(gate.shape) != 2:
            raise ValueError(f"gate must be [E, H], got a QuantizedTensor of shape {tuple(gate.shape)}")
        if gate.shape[1] != x.shape[1]:
            raise ValueError(f"gate hidden size must match x.shape[1]: gate must be [E, {x.shape[1]}], got shape {tuple(gate.shape)}")
        gate_tensor, gate_scales, bits, group_size = gate.qdata, gate.scales, gate.bits, gate.group_size
    else:
        check_tensor(gate, "gate", FLOAT_DTYPES, dim=2, layout="[E, H] (or a QuantizedTensor)")
        gate_tensor, gate_scales, bits, group_size = gate.detach(), None, 0, 1
    num_experts = gate_tensor.shape[0]
    if num_experts < 1:
        raise ValueError(f"gate must have at least one expert (row), got shape {tuple(gate_tensor.shape)}")
    top_k = check_int(top_k, "top_k", lo=1, hi=num_experts)
    check_choice(scoring, "scoring", SCORINGS)
    check_bool(renormalize, "renormalize")
    if counts is None:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    else:
        check_tensor(counts, "counts", (torch.int64,), dim=1, layout="[E]")
    if x.dtype == torch.float64:
        x = x.float()
    # Forward-only by design (profiling and routing decisions): no gradient flows back.
    weights, ids = library.route_profile_op(
        x.detach().contiguous(), gate_tensor.detach(), gate_scales, bits, group_size, top_k, scoring, renormalize,
        counts,
    )
    return weights, ids, counts


def _as_stacks(value: WeightStack | Sequence[WeightStack], name: str, dtype: torch.dtype) -> list[Tensor]:
    """One stack or a sequence of them -> list of dense tensors (QuantizedTensor stacks are
    dequantized to ``dtype``); the layout checks are library.check_merged_moe_fwd's."""
    if isinstance(value, (Tensor, QuantizedTensor)):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise TypeError(f"{name} must be a Tensor, a QuantizedTensor or a list of them, got {describe(value)}")
    if len(items) < 1:
        raise ValueError(f"{name} must hold at least one stack, got an empty {type(value).__name__}")
    stacks = []
    for i, item in enumerate(items):
        if isinstance(item, QuantizedTensor):  # frozen groups may be stored quantized
            item.validate(f"{name}[{i}]")
            if len(item.shape) != 3:
                raise ValueError(f"{name}[{i}] must be a 3-D stack, got a QuantizedTensor of shape {tuple(item.shape)}")
            item = item.dequantize(dtype)
        elif not isinstance(item, Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor or a QuantizedTensor, got {describe(item)}")
        stacks.append(item)
    return stacks


def merged_moe(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up: WeightStack | Sequence[WeightStack],
    down: WeightStack | Sequence[WeightStack],
    expert_to_group: Tensor,
    *,
    activation: str = "silu",
) -> Tensor:
    """MoE expert computation where E original experts are served by G <= E groups.

    Args:
        x: hidden states [T, H], fp32/bf16/fp16/fp64 (T and H may be 0).
        topk_ids: routed experts [T, k], int32 or int64, values in [0, E) (k may be 0).
        topk_weights: routing weights [T, k], fp32 or x.dtype.
        gate_up: [G, 2I, H] (rows [0, I) gate, [I, 2I) up; transformers 5.x layout; I >= 1) in
            x.dtype, or a list of such stacks whose groups are numbered consecutively (a stack
            may hold 0 groups); stacks whose weights do not require grad get no weight-gradient
            work.  A QuantizedTensor stack is dequantized for the call (frozen groups).
        down: [G, H, I] (or a matching list of stacks) in x.dtype.
        expert_to_group: int32 or int64 [E] (E >= 1): the group serving each original expert,
            -1 = dropped; values in [-1, G) (int64 values are checked before narrowing).
        activation: "silu" (SwiGLU) or "gelu" (GeGLU, exact erf).

    Returns:
        y [T, H] in x.dtype.  A token whose top-k hit one group twice runs it once with the
        summed weight; a token whose experts are all dropped gets 0 (and zero gradients), also
        when k = 0 or the stacks hold no group at all.  Differentiable w.r.t. x, topk_weights,
        gate_up and down.
    """
    check_tensor(x, "x", FLOAT_DTYPES, dim=2, layout="[T, H]")
    check_tensor(topk_ids, "topk_ids", INDEX_DTYPES, dim=2, layout="[T, k]")
    check_tensor(topk_weights, "topk_weights", layout="[T, k]")
    check_tensor(expert_to_group, "expert_to_group", INDEX_DTYPES, dim=1, layout="[E]")
    check_choice(activation, "activation", ACTIVATIONS)
    gate_up_stacks = _as_stacks(gate_up, "gate_up", x.dtype)
    down_stacks = _as_stacks(down, "down", x.dtype)
    y, *_ = library.merged_moe_fwd(
        x.contiguous(),
        topk_ids.contiguous(),
        topk_weights.contiguous(),
        gate_up_stacks,
        down_stacks,
        expert_to_group.contiguous(),
        activation,
    )
    return y
