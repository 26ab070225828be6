"""Public ops: argument checking and packing around the custom ops of flux.ops.library."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from flux.ops import library
from flux.ops.quantized import QuantizedTensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
ACTIVATIONS = ("silu", "gelu")
SCORINGS = ("softmax", "sigmoid")

WeightStack = Union[Tensor, QuantizedTensor]


def _require(cond: bool, message: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(message)


def quantize(w: Tensor, bits: int = 4, group_size: int = 64) -> QuantizedTensor:
    """Symmetric per-group integer quantization of the last dim of ``w``.

    Args:
        w: float tensor [..., C] (fp32/bf16/fp16), any number of leading dims.
        bits: 4 (two values packed per byte) or 8.
        group_size: consecutive elements of the last dim sharing one fp32 scale.

    Returns:
        A :class:`QuantizedTensor`; ``.dequantize()`` is within ``scale / 2`` of ``w``
        elementwise, ``scale = absmax(group) / (7 or 127)``.
    """
    _require(isinstance(w, Tensor), f"w must be a Tensor, got {type(w).__name__}", TypeError)
    _require(w.dtype in FLOAT_DTYPES, f"w must be a floating tensor, got dtype {w.dtype}", TypeError)
    _require(w.dim() >= 1 and w.numel() > 0, f"w must be non-empty with at least 1 dim, got shape {tuple(w.shape)}")
    _require(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    _require(isinstance(group_size, int) and group_size >= 1, f"group_size must be a positive int, got {group_size}")
    rows = w.detach().reshape(-1, w.shape[-1]).contiguous()
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
        x: hidden states [T, H], fp32/bf16/fp16 (T may be 0).
        gate: router weight [E, H], dense float or a :class:`QuantizedTensor`.
        top_k: experts per token, 1 <= top_k <= E.
        scoring: "softmax" (over all E) or "sigmoid".
        renormalize: divide the k weights of a token by their sum.
        counts: optional int64 [E] accumulated in place (profiling over many batches).

    Returns:
        (topk_weights fp32 [T, k], topk_ids int32 [T, k], counts int64 [E]).  Ids are in
        descending logit order; ties go to the lower expert index.  The op is forward-only:
        the returned weights carry no gradient to x or the gate (use the model's router for
        a differentiable routing path).
    """
    _require(isinstance(x, Tensor) and x.dim() == 2, f"x must be a 2-D tensor [T, H], got {getattr(x, 'shape', type(x))}")
    _require(x.dtype in FLOAT_DTYPES, f"x must be floating, got dtype {x.dtype}", TypeError)
    hidden = x.shape[1]
    if isinstance(gate, QuantizedTensor):
        _require(len(gate.shape) == 2, f"gate must be [E, H], got shape {tuple(gate.shape)}")
        gate_tensor, gate_scales, bits, group_size = gate.qdata, gate.scales, gate.bits, gate.group_size
        num_experts = gate.shape[0]
        gate_hidden = gate.shape[1]
    else:
        _require(isinstance(gate, Tensor) and gate.dim() == 2, "gate must be a 2-D tensor [E, H] or a QuantizedTensor")
        _require(gate.dtype in FLOAT_DTYPES, f"gate must be floating, got dtype {gate.dtype}", TypeError)
        gate_tensor, gate_scales, bits, group_size = gate.contiguous(), None, 0, 1
        num_experts, gate_hidden = gate.shape
    _require(gate_hidden == hidden, f"gate hidden size {gate_hidden} does not match x hidden size {hidden}")
    _require(gate_tensor.device == x.device, f"gate is on {gate_tensor.device} but x is on {x.device}")
    _require(isinstance(top_k, int) and 1 <= top_k <= num_experts, f"top_k must be in [1, {num_experts}], got {top_k}")
    _require(scoring in SCORINGS, f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if counts is None:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    else:
        _require(isinstance(counts, Tensor) and counts.dtype == torch.int64 and counts.shape == (num_experts,),
                 f"counts must be an int64 tensor of shape [{num_experts}], got {getattr(counts, 'dtype', None)} {tuple(getattr(counts, 'shape', ()))}")
        _require(counts.device == x.device, f"counts is on {counts.device} but x is on {x.device}")
        _require(counts.is_contiguous(), "counts must be contiguous (it is updated in place)")
    if x.dtype == torch.float64:
        x = x.float()
    # Forward-only by design (profiling and routing decisions): no gradient flows back.
    weights, ids = library.route_profile_op(
        x.detach().contiguous(), gate_tensor.detach(), gate_scales, bits, group_size, top_k, scoring, bool(renormalize), counts
    )
    return weights, ids, counts


def _as_stacks(value: WeightStack | Sequence[WeightStack], name: str, dtype: torch.dtype) -> list[Tensor]:
    items = [value] if isinstance(value, (Tensor, QuantizedTensor)) else list(value)
    _require(len(items) >= 1, f"{name} must hold at least one stack")
    stacks = []
    for i, item in enumerate(items):
        if isinstance(item, QuantizedTensor):  # frozen groups may be stored quantized
            item = item.dequantize(dtype)
        _require(isinstance(item, Tensor) and item.dim() == 3,
                 f"{name}[{i}] must be a 3-D tensor, got {getattr(item, 'shape', type(item))}")
        _require(item.is_contiguous(), f"{name}[{i}] must be contiguous (copying weights each call would hide a cost)")
        _require(item.dtype == dtype, f"{name}[{i}] has dtype {item.dtype}, expected x.dtype {dtype}", TypeError)
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
        x: hidden states [T, H], fp32/bf16/fp16.
        topk_ids: routed experts [T, k], int32 or int64, values in [0, E).
        topk_weights: routing weights [T, k], fp32 or x.dtype.
        gate_up: [G, 2I, H] (rows [0, I) gate, [I, 2I) up; transformers 5.x layout) in x.dtype,
            or a sequence of such stacks whose groups are numbered consecutively; stacks whose
            weights do not require grad get no weight-gradient work.  A QuantizedTensor stack
            is dequantized for the call (frozen groups).
        down: [G, H, I] (or a matching sequence of stacks) in x.dtype.
        expert_to_group: int32 [E]: the group serving each original expert, -1 = dropped.
        activation: "silu" (SwiGLU) or "gelu" (GeGLU, exact erf).

    Returns:
        y [T, H] in x.dtype.  A token whose top-k hit one group twice runs it once with the
        summed weight.  Differentiable w.r.t. x, topk_weights, gate_up and down.
    """
    _require(isinstance(x, Tensor) and x.dim() == 2, f"x must be a 2-D tensor [T, H], got {getattr(x, 'shape', type(x))}")
    _require(x.dtype in FLOAT_DTYPES, f"x must be floating, got dtype {x.dtype}", TypeError)
    _require(isinstance(topk_ids, Tensor) and topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0],
             f"topk_ids must be [T, k] with T = {x.shape[0]}, got {getattr(topk_ids, 'shape', type(topk_ids))}")
    _require(topk_ids.dtype in INDEX_DTYPES, f"topk_ids must be int32 or int64, got {topk_ids.dtype}", TypeError)
    _require(topk_ids.shape[1] >= 1, "topk_ids must have k >= 1 columns")
    _require(isinstance(topk_weights, Tensor) and topk_weights.shape == topk_ids.shape,
             f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, got {getattr(topk_weights, 'shape', None)}")
    _require(topk_weights.dtype in (torch.float32, x.dtype),
             f"topk_weights must be float32 or x.dtype ({x.dtype}), got {topk_weights.dtype}", TypeError)
    _require(isinstance(expert_to_group, Tensor) and expert_to_group.dim() == 1 and expert_to_group.numel() >= 1,
             "expert_to_group must be a non-empty 1-D integer tensor [E]")
    _require(expert_to_group.dtype in INDEX_DTYPES, f"expert_to_group must be int32, got {expert_to_group.dtype}", TypeError)
    _require(activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    gate_up_stacks = _as_stacks(gate_up, "gate_up", x.dtype)
    down_stacks = _as_stacks(down, "down", x.dtype)
    _require(len(gate_up_stacks) == len(down_stacks),
             f"gate_up has {len(gate_up_stacks)} stacks but down has {len(down_stacks)}")
    hidden = x.shape[1]
    two_i = gate_up_stacks[0].shape[1]
    _require(two_i % 2 == 0 and two_i > 0, f"gate_up must be [G, 2I, H] with an even, non-zero 2I; got {two_i}")
    for i, (w1, w2) in enumerate(zip(gate_up_stacks, down_stacks)):
        _require(w1.shape[1:] == (two_i, hidden),
                 f"gate_up[{i}] must be [G, {two_i}, {hidden}] (H = x.shape[1]), got {tuple(w1.shape)}")
        _require(w2.shape == (w1.shape[0], hidden, two_i // 2),
                 f"down[{i}] must be [{w1.shape[0]}, {hidden}, {two_i // 2}] to match gate_up, got {tuple(w2.shape)}")
        _require(w1.device == x.device and w2.device == x.device, f"stack {i} is not on x's device {x.device}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights), ("expert_to_group", expert_to_group)):
        _require(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}")
    y, *_ = library.merged_moe_fwd(
        x.contiguous(),
        topk_ids.contiguous(),
        topk_weights.contiguous(),
        gate_up_stacks,
        down_stacks,
        expert_to_group.to(torch.int32).contiguous(),
        activation,
    )
    return y
