"""The `flux` custom ops: schema, fake kernel, autograd, and backend dispatch.

Each op is a ``torch.library.custom_op`` so it works under ``torch.compile`` and passes
``torch.library.opcheck``.  The op body only picks a backend (flux/ops/backends) and calls it;
the semantics every backend implements are in flux/ops/contracts.md.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flux.ops import backends

# ----------------------------------------------------------------------------- quantize


@torch.library.custom_op("flux::quantize", mutates_args=())
def quantize_rows(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Quantize the rows of ``w`` [R, C] (float) -> (qdata, scales fp32 [R, ceil(C/gs)])."""
    _, impl = backends.resolve("quantize", w.device.type)
    return impl.quantize(w, bits, group_size)


@quantize_rows.register_fake
def _(w, bits, group_size):
    rows, cols = w.shape
    n_groups = -(-cols // group_size)
    if bits == 8:
        qdata = w.new_empty(rows, cols, dtype=torch.int8)
    else:
        qdata = w.new_empty(rows, (cols + 1) // 2, dtype=torch.uint8)
    return qdata, w.new_empty(rows, n_groups, dtype=torch.float32)


@torch.library.custom_op("flux::dequantize", mutates_args=())
def dequantize_rows(
    qdata: Tensor, scales: Tensor, bits: int, group_size: int, cols: int, dtype: torch.dtype
) -> Tensor:
    """Inverse of :func:`quantize_rows`: -> ``dtype`` [R, cols]."""
    _, impl = backends.resolve("dequantize", qdata.device.type)
    return impl.dequantize(qdata, scales, bits, group_size, cols, dtype)


@dequantize_rows.register_fake
def _(qdata, scales, bits, group_size, cols, dtype):
    return qdata.new_empty(qdata.shape[0], cols, dtype=dtype)


# ----------------------------------------------------------------------------- route_profile


@torch.library.custom_op("flux::route_profile", mutates_args=("counts",))
def route_profile_op(
    x: Tensor,
    gate: Tensor,
    gate_scales: Optional[Tensor],
    gate_bits: int,
    group_size: int,
    top_k: int,
    scoring: str,
    renormalize: bool,
    counts: Tensor,
) -> tuple[Tensor, Tensor]:
    """See flux.ops.route_profile; ``counts`` int64 [E] is accumulated in place."""
    _, impl = backends.resolve("route_profile", x.device.type)
    return impl.route_profile(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts)


@route_profile_op.register_fake
def _(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts):
    tokens = x.shape[0]
    return (
        x.new_empty(tokens, top_k, dtype=torch.float32),
        x.new_empty(tokens, top_k, dtype=torch.int32),
    )


# ----------------------------------------------------------------------------- merged_moe


def _check_index_ranges(topk_ids: Tensor, expert_to_group: Tensor, num_groups: int) -> None:
    """Value checks that need the data; done on CPU only (on GPU they would sync the host)."""
    if topk_ids.device.type != "cpu" or topk_ids.numel() == 0:
        return
    num_experts = expert_to_group.numel()
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= num_experts:
        raise IndexError(f"topk_ids must lie in [0, {num_experts}) (num experts); found [{lo}, {hi}]")
    glo, ghi = int(expert_to_group.min()), int(expert_to_group.max())
    if glo < -1 or ghi >= num_groups:
        raise IndexError(
            f"expert_to_group must lie in [-1, {num_groups}) (num groups); found [{glo}, {ghi}]"
        )


@torch.library.custom_op("flux::merged_moe_fwd", mutates_args=())
def merged_moe_fwd(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up: list[Tensor],
    down: list[Tensor],
    expert_to_group: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (y, pre_act, pair_weight, group_offsets, sorted_slot, pair_of_slot); see contracts.md."""
    num_groups = sum(w.shape[0] for w in gate_up)
    _check_index_ranges(topk_ids, expert_to_group, num_groups)
    _, router = backends.resolve("moe_routing", x.device.type)
    group_offsets, sorted_slot, pair_of_slot = router.moe_routing(topk_ids, expert_to_group, num_groups)
    _, impl = backends.resolve("merged_moe_fwd", x.device.type)
    y, pre_act, pair_weight = impl.merged_moe_fwd(
        x, topk_weights, gate_up, down, group_offsets, sorted_slot, pair_of_slot, activation
    )
    return y, pre_act, pair_weight, group_offsets, sorted_slot, pair_of_slot


@merged_moe_fwd.register_fake
def _(x, topk_ids, topk_weights, gate_up, down, expert_to_group, activation):
    tokens, k = topk_ids.shape
    num_groups = sum(w.shape[0] for w in gate_up)
    return (
        x.new_empty(tokens, x.shape[1]),
        x.new_empty(tokens * k, gate_up[0].shape[1]),
        x.new_empty(tokens * k, dtype=torch.float32),
        x.new_empty(num_groups + 1, dtype=torch.int64),
        x.new_empty(tokens * k, dtype=torch.int32),
        x.new_empty(tokens, k, dtype=torch.int32),
    )


@torch.library.custom_op("flux::merged_moe_bwd", mutates_args=())
def merged_moe_bwd(
    grad_y: Tensor,
    x: Tensor,
    topk_weights: Tensor,
    gate_up: list[Tensor],
    down: list[Tensor],
    pre_act: Tensor,
    pair_weight: Tensor,
    group_offsets: Tensor,
    sorted_slot: Tensor,
    pair_of_slot: Tensor,
    activation: str,
    need_grad_x: bool,
    need_grad_weights: bool,
    need_grad_stacks: list[bool],
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Gradients of merged_moe_fwd; numel-0 tensors stand for gradients not requested."""
    _, impl = backends.resolve("merged_moe_bwd", x.device.type)
    return impl.merged_moe_bwd(
        grad_y, x, topk_weights, gate_up, down, pre_act, pair_weight, group_offsets,
        sorted_slot, pair_of_slot, activation, need_grad_x, need_grad_weights, need_grad_stacks,
    )


@merged_moe_bwd.register_fake
def _(grad_y, x, topk_weights, gate_up, down, pre_act, pair_weight, group_offsets, sorted_slot,
      pair_of_slot, activation, need_grad_x, need_grad_weights, need_grad_stacks):
    grad_x = torch.empty_like(x) if need_grad_x else x.new_empty(0)
    grad_w = torch.empty_like(topk_weights) if need_grad_weights else topk_weights.new_empty(0)
    grad_gate_up = [torch.empty_like(w) if need else w.new_empty(0) for w, need in zip(gate_up, need_grad_stacks)]
    grad_down = [torch.empty_like(w) if need else w.new_empty(0) for w, need in zip(down, need_grad_stacks)]
    return grad_x, grad_w, grad_gate_up, grad_down


def _setup_context(ctx, inputs, output) -> None:
    x, topk_ids, topk_weights, gate_up, down, expert_to_group, activation = inputs
    _, pre_act, pair_weight, group_offsets, sorted_slot, pair_of_slot = output
    ctx.num_stacks = len(gate_up)
    ctx.activation = activation
    ctx.need_grad_x = x.requires_grad
    ctx.need_grad_weights = topk_weights.requires_grad
    ctx.need_grad_stacks = [g.requires_grad or d.requires_grad for g, d in zip(gate_up, down)]
    ctx.save_for_backward(
        x, topk_weights, pre_act, pair_weight, group_offsets, sorted_slot, pair_of_slot, *gate_up, *down
    )


def _backward(ctx, grad_y, *unused_grads):
    x, topk_weights, pre_act, pair_weight, group_offsets, sorted_slot, pair_of_slot, *weights = ctx.saved_tensors
    gate_up, down = weights[: ctx.num_stacks], weights[ctx.num_stacks :]
    grad_x, grad_w, grad_gate_up, grad_down = merged_moe_bwd(
        grad_y, x, topk_weights, gate_up, down, pre_act, pair_weight, group_offsets, sorted_slot,
        pair_of_slot, ctx.activation, ctx.need_grad_x, ctx.need_grad_weights, ctx.need_grad_stacks,
    )

    def keep(grad: Tensor, needed: bool) -> Tensor | None:
        return grad if needed else None

    return (
        keep(grad_x, ctx.need_grad_x),
        None,
        keep(grad_w, ctx.need_grad_weights),
        [keep(g, need) for g, need in zip(grad_gate_up, ctx.need_grad_stacks)],
        [keep(g, need) for g, need in zip(grad_down, ctx.need_grad_stacks)],
        None,
        None,
    )


merged_moe_fwd.register_autograd(_backward, setup_context=_setup_context)
