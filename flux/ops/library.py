"""The `flux` custom ops: schema, fake kernel, autograd, and backend dispatch.

Each op is a ``torch.library.custom_op`` so it works under ``torch.compile`` and passes
``torch.library.opcheck``.  The op body only picks a backend (flux/ops/backends) and calls it;
the semantics every backend implements are in flux/ops/contracts.md.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from flux.ops import backends
from flux.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    INT32_MAX,
    check_bool,
    check_choice,
    check_index_values,
    check_int,
    check_same_device,
    check_tensor,
    describe,
)
from flux.ops.quantized import QDATA_DTYPE

ACTIVATIONS = ("silu", "gelu")
SCORINGS = ("softmax", "sigmoid")

# ----------------------------------------------------------------------------- quantize


def _check_bits(bits: Any, name: str = "bits") -> int:
    bits = check_int(bits, name)
    if bits not in QDATA_DTYPE:
        raise ValueError(f"{name} must be 4 or 8, got {bits}")
    return bits


def check_quantize_rows(w: Tensor, bits: int, group_size: int) -> None:
    """Arguments of :func:`quantize_rows` (metadata only)."""
    check_tensor(w, "w", FLOAT_DTYPES, dim=2, layout="[R, C]", contiguous=True)
    _check_bits(bits)
    check_int(group_size, "group_size", lo=1, hi=INT32_MAX)


def check_dequantize_rows(qdata: Tensor, scales: Tensor, bits: int, group_size: int, cols: int,
                          dtype: torch.dtype, names: tuple[str, str, str] = ("qdata", "scales", "cols")) -> None:
    """Arguments of :func:`dequantize_rows` (metadata only); ``names`` are how the caller calls
    qdata, scales and cols (route_profile: gate, gate_scales, H)."""
    qname, sname, cname = names
    bits = _check_bits(bits, "gate_bits" if qname == "gate" else "bits")
    group_size = check_int(group_size, "group_size", lo=1, hi=INT32_MAX)
    cols = check_int(cols, cname, lo=0)
    check_tensor(qdata, qname, (QDATA_DTYPE[bits],), dim=2, layout=f"[R, {'C' if bits == 8 else 'ceil(C / 2)'}]",
                 contiguous=True)
    check_tensor(scales, sname, (torch.float32,), dim=2, layout="[R, n_groups]", contiguous=True)
    check_same_device(scales, sname, qdata, qname)
    qcols = cols if bits == 8 else (cols + 1) // 2
    if qdata.shape[1] != qcols:
        raise ValueError(
            f"{qname} must have {qcols} columns for {cname} = {cols} at {bits} bits, got shape {tuple(qdata.shape)}"
        )
    n_groups = -(-cols // group_size)
    if tuple(scales.shape) != (qdata.shape[0], n_groups):
        raise ValueError(
            f"{sname} must have shape [{qdata.shape[0]}, {n_groups}] (rows of {qname}, ceil({cname} / group_size)), "
            f"got {tuple(scales.shape)}"
        )
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating torch.dtype (float32/bfloat16/float16/float64), got {describe(dtype)}")


@torch.library.custom_op("flux::quantize", mutates_args=())
def quantize_rows(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Quantize the rows of ``w`` [R, C] (float) -> (qdata, scales fp32 [R, ceil(C/gs)])."""
    check_quantize_rows(w, bits, group_size)
    _, impl = backends.resolve("quantize", w.device.type)
    return impl.quantize(w, bits, group_size)


@quantize_rows.register_fake
def _(w, bits, group_size):
    check_quantize_rows(w, bits, group_size)
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
    check_dequantize_rows(qdata, scales, bits, group_size, cols, dtype)
    _, impl = backends.resolve("dequantize", qdata.device.type)
    return impl.dequantize(qdata, scales, bits, group_size, cols, dtype)


@dequantize_rows.register_fake
def _(qdata, scales, bits, group_size, cols, dtype):
    check_dequantize_rows(qdata, scales, bits, group_size, cols, dtype)
    return qdata.new_empty(qdata.shape[0], cols, dtype=dtype)


# ----------------------------------------------------------------------------- route_profile


def check_route_profile(x: Tensor, gate: Tensor, gate_scales: Optional[Tensor], gate_bits: int, group_size: int,
                        top_k: int, scoring: str, renormalize: bool, counts: Tensor) -> None:
    """Arguments of :func:`route_profile_op` (metadata only)."""
    check_tensor(x, "x", FLOAT_DTYPES, dim=2, layout="[T, H]", contiguous=True)
    hidden = x.shape[1]
    gate_bits = check_int(gate_bits, "gate_bits")
    if gate_bits == 0:
        check_tensor(gate, "gate", FLOAT_DTYPES, dim=2, layout="[E, H]")
        if gate_scales is not None:
            raise ValueError(f"gate_scales must be None for a dense gate (gate_bits = 0), got {describe(gate_scales)}")
        if gate.shape[1] != hidden:
            raise ValueError(f"gate hidden size must match x.shape[1]: gate must be [E, {hidden}], got shape {tuple(gate.shape)}")
    elif gate_bits in QDATA_DTYPE:
        if gate_scales is None:
            raise ValueError(f"gate_scales is required for a quantized gate (gate_bits = {gate_bits})")
        check_dequantize_rows(gate, gate_scales, gate_bits, group_size, hidden, torch.float32,
                              names=("gate", "gate_scales", "H (x.shape[1])"))
    else:
        raise ValueError(f"gate_bits must be 0 (dense gate), 4 or 8, got {gate_bits}")
    check_same_device(gate, "gate", x, "x")
    num_experts = gate.shape[0]
    if num_experts < 1:
        raise ValueError(f"gate must have at least one expert (row), got shape {tuple(gate.shape)}")
    check_int(top_k, "top_k", lo=1, hi=num_experts)
    check_choice(scoring, "scoring", SCORINGS)
    check_bool(renormalize, "renormalize")
    check_tensor(counts, "counts", (torch.int64,), dim=1, layout="[E]", contiguous=True)
    if counts.shape[0] != num_experts:
        raise ValueError(f"counts must have shape [{num_experts}] (E = gate.shape[0]), got {tuple(counts.shape)}")
    check_same_device(counts, "counts", x, "x")


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
    check_route_profile(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts)
    _, impl = backends.resolve("route_profile", x.device.type)
    return impl.route_profile(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts)


@route_profile_op.register_fake
def _(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts):
    check_route_profile(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts)
    tokens = x.shape[0]
    return (
        x.new_empty(tokens, top_k, dtype=torch.float32),
        x.new_empty(tokens, top_k, dtype=torch.int32),
    )


# ----------------------------------------------------------------------------- merged_moe


def _check_stacks(gate_up: Any, down: Any, x: Tensor) -> tuple[int, int]:
    """gate_up [G_s, 2I, H] / down [G_s, H, I] stacks matching x; -> (G = sum G_s, I)."""
    for name, stacks in (("gate_up", gate_up), ("down", down)):
        if not isinstance(stacks, (list, tuple)) or len(stacks) < 1:
            raise ValueError(f"{name} must hold at least one stack, got {describe(stacks)}")
    if len(gate_up) != len(down):
        raise ValueError(f"gate_up has {len(gate_up)} stacks but down has {len(down)}: they must match")
    hidden = x.shape[1]
    for name, stacks in (("gate_up", gate_up), ("down", down)):
        for i, w in enumerate(stacks):
            check_tensor(w, f"{name}[{i}]", dim=3, layout="[G, 2I, H]" if name == "gate_up" else "[G, H, I]")
            if w.dtype != x.dtype:
                raise TypeError(f"{name}[{i}] must have dtype x.dtype ({x.dtype}), got {w.dtype}")
            if not w.is_contiguous():
                raise ValueError(
                    f"{name}[{i}] must be contiguous (copying weights each call would hide a cost), "
                    f"got strides {w.stride()}"
                )
            check_same_device(w, f"{name}[{i}]", x, "x")
    two_i = gate_up[0].shape[1]
    if two_i % 2 or two_i < 2:
        raise ValueError(f"gate_up[0] must be [G, 2I, H] with an even 2I >= 2 (I >= 1), got 2I = {two_i}")
    for i, (w1, w2) in enumerate(zip(gate_up, down)):
        if tuple(w1.shape[1:]) != (two_i, hidden):
            raise ValueError(
                f"gate_up[{i}] must be [G, {two_i}, {hidden}] (2I of gate_up[0], H = x.shape[1]), got {tuple(w1.shape)}"
            )
        if tuple(w2.shape) != (w1.shape[0], hidden, two_i // 2):
            raise ValueError(
                f"down[{i}] must be [{w1.shape[0]}, {hidden}, {two_i // 2}] to match gate_up[{i}], got {tuple(w2.shape)}"
            )
    num_groups = sum(w.shape[0] for w in gate_up)
    if num_groups > INT32_MAX:
        raise ValueError(f"gate_up: {num_groups} groups in all exceed the int32 group-id range")
    return num_groups, two_i // 2


def check_merged_moe_fwd(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Sequence[Tensor],
                         down: Sequence[Tensor], expert_to_group: Tensor, activation: str) -> int:
    """Arguments of :func:`merged_moe_fwd` (metadata only); -> G, the number of groups."""
    check_tensor(x, "x", FLOAT_DTYPES, dim=2, layout="[T, H]", contiguous=True)
    tokens = x.shape[0]
    check_tensor(topk_ids, "topk_ids", INDEX_DTYPES, dim=2, layout="[T, k]", contiguous=True)
    if topk_ids.shape[0] != tokens:
        raise ValueError(f"topk_ids must be [T, k] with T = x.shape[0] = {tokens}, got shape {tuple(topk_ids.shape)}")
    if topk_ids.numel() > INT32_MAX:
        raise ValueError(f"topk_ids: T * k = {topk_ids.numel()} exceeds the int32 slot range")
    check_tensor(topk_weights, "topk_weights", contiguous=True)
    if topk_weights.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"topk_weights must be float32 or x.dtype ({x.dtype}), got dtype {topk_weights.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
        )
    check_tensor(expert_to_group, "expert_to_group", INDEX_DTYPES, dim=1, layout="[E]", contiguous=True)
    if expert_to_group.numel() < 1:
        raise ValueError("expert_to_group must be a non-empty 1-D tensor [E] (E >= 1 experts), got shape (0,)")
    check_choice(activation, "activation", ACTIVATIONS)
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights), ("expert_to_group", expert_to_group)):
        check_same_device(t, name, x, "x")
    num_groups, _ = _check_stacks(gate_up, down, x)
    return num_groups


def _check_index_ranges(topk_ids: Tensor, expert_to_group: Tensor, num_groups: int) -> None:
    """Value checks that need the data; done on CPU only (on GPU they would sync the host)."""
    num_experts = expert_to_group.numel()
    check_index_values(topk_ids, "topk_ids", 0, num_experts, f"expert ids, E = expert_to_group.numel() = {num_experts}")
    check_index_values(expert_to_group, "expert_to_group", -1, num_groups,
                       f"-1 = dropped, else a group id, G = {num_groups} groups in the stacks")


def _expert_to_group_int32(expert_to_group: Tensor, num_groups: int) -> Tensor:
    """int32 copy of the group map.  On CPU its values were checked; elsewhere (no host sync) an
    int64 value outside [-1, G) becomes -1 (dropped, as the GPU kernels treat out-of-range ids)
    instead of wrapping modulo 2**32 onto a valid group."""
    if expert_to_group.dtype == torch.int32:
        return expert_to_group
    if expert_to_group.device.type != "cpu":
        valid = (expert_to_group >= -1) & (expert_to_group < num_groups)
        expert_to_group = torch.where(valid, expert_to_group, torch.full_like(expert_to_group, -1))
    return expert_to_group.to(torch.int32)


def _no_pair_routing(tokens: int, k: int, num_groups: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Routing metadata when no slot can have a group (k = 0 or G = 0): every slot dropped."""
    return (
        torch.zeros(num_groups + 1, dtype=torch.int64, device=device),
        torch.arange(tokens * k, dtype=torch.int32, device=device),
        torch.full((tokens, k), -1, dtype=torch.int32, device=device),
    )


def _nonempty_stacks(gate_up: Sequence[Tensor]) -> list[int]:
    """Indices of the stacks holding >= 1 group.  A 0-group stack adds nothing and does not shift
    the global group numbering, so the backends never see one (the Triton kernels index it)."""
    return [s for s, w in enumerate(gate_up) if w.shape[0] > 0]


def _no_arithmetic(k: int, num_groups: int, hidden: int) -> bool:
    """Shapes for which y and every gradient are zero whatever the data: no slot (k = 0), no group
    (G = 0: every expert dropped) or H = 0.  Handled here, identically for every backend (the
    native kernels require k, G >= 1)."""
    return k == 0 or num_groups == 0 or hidden == 0


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
    """-> (y, pre_act, pair_weight, group_offsets, sorted_slot, pair_of_slot); see contracts.md.

    ``expert_to_group`` may be int32 or int64 (checked before it is narrowed to int32)."""
    num_groups = check_merged_moe_fwd(x, topk_ids, topk_weights, gate_up, down, expert_to_group, activation)
    _check_index_ranges(topk_ids, expert_to_group, num_groups)
    e2g = _expert_to_group_int32(expert_to_group, num_groups)
    tokens, k = topk_ids.shape
    if k == 0 or num_groups == 0:
        group_offsets, sorted_slot, pair_of_slot = _no_pair_routing(tokens, k, num_groups, x.device)
    else:
        _, router = backends.resolve("moe_routing", x.device.type)
        group_offsets, sorted_slot, pair_of_slot = router.moe_routing(topk_ids, e2g, num_groups)
    if _no_arithmetic(k, num_groups, x.shape[1]):
        from flux.ops.backends.reference import pair_weights

        y = torch.zeros_like(x)
        pre_act = x.new_zeros(tokens * k, gate_up[0].shape[1])
        pair_weight = pair_weights(topk_weights, pair_of_slot)
    else:
        _, impl = backends.resolve("merged_moe_fwd", x.device.type)
        keep = _nonempty_stacks(gate_up)
        y, pre_act, pair_weight = impl.merged_moe_fwd(
            x, topk_weights, [gate_up[s] for s in keep], [down[s] for s in keep], group_offsets, sorted_slot,
            pair_of_slot, activation,
        )
    return y, pre_act, pair_weight, group_offsets, sorted_slot, pair_of_slot


@merged_moe_fwd.register_fake
def _(x, topk_ids, topk_weights, gate_up, down, expert_to_group, activation):
    num_groups = check_merged_moe_fwd(x, topk_ids, topk_weights, gate_up, down, expert_to_group, activation)
    tokens, k = topk_ids.shape
    return (
        x.new_empty(tokens, x.shape[1]),
        x.new_empty(tokens * k, gate_up[0].shape[1]),
        x.new_empty(tokens * k, dtype=torch.float32),
        x.new_empty(num_groups + 1, dtype=torch.int64),
        x.new_empty(tokens * k, dtype=torch.int32),
        x.new_empty(tokens, k, dtype=torch.int32),
    )


def check_merged_moe_bwd(grad_y: Tensor, x: Tensor, topk_weights: Tensor, gate_up: Sequence[Tensor],
                         down: Sequence[Tensor], pre_act: Tensor, pair_weight: Tensor, group_offsets: Tensor,
                         sorted_slot: Tensor, pair_of_slot: Tensor, activation: str, need_grad_x: bool,
                         need_grad_weights: bool, need_grad_stacks: Sequence[bool]) -> int:
    """Arguments of :func:`merged_moe_bwd` (metadata only; the routing metadata's values come
    from merged_moe_fwd and are bounds-checked again by the native kernels); -> G."""
    check_tensor(x, "x", FLOAT_DTYPES, dim=2, layout="[T, H]", contiguous=True)
    tokens, hidden = x.shape
    check_tensor(grad_y, "grad_y", (x.dtype,), dim=2, layout="[T, H]")
    if tuple(grad_y.shape) != (tokens, hidden):
        raise ValueError(f"grad_y must have the shape of x {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    check_tensor(pair_of_slot, "pair_of_slot", (torch.int32,), dim=2, layout="[T, k]", contiguous=True)
    if pair_of_slot.shape[0] != tokens:
        raise ValueError(f"pair_of_slot must be [T, k] with T = {tokens}, got {tuple(pair_of_slot.shape)}")
    slots = pair_of_slot.numel()
    check_tensor(topk_weights, "topk_weights", contiguous=True)
    if topk_weights.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"topk_weights must be float32 or x.dtype ({x.dtype}), got dtype {topk_weights.dtype}")
    if topk_weights.shape != pair_of_slot.shape:
        raise ValueError(f"topk_weights must be [T, k] = {tuple(pair_of_slot.shape)}, got {tuple(topk_weights.shape)}")
    num_groups, inter = _check_stacks(gate_up, down, x)
    check_tensor(pre_act, "pre_act", (x.dtype,), dim=2, layout="[T * k, 2I]", contiguous=True)
    if tuple(pre_act.shape) != (slots, 2 * inter):
        raise ValueError(f"pre_act must be [T * k, 2I] = [{slots}, {2 * inter}], got {tuple(pre_act.shape)}")
    check_tensor(pair_weight, "pair_weight", (torch.float32,), dim=1, layout="[T * k]", contiguous=True)
    check_tensor(group_offsets, "group_offsets", (torch.int64,), dim=1, layout="[G + 1]", contiguous=True)
    check_tensor(sorted_slot, "sorted_slot", (torch.int32,), dim=1, layout="[T * k]", contiguous=True)
    for name, t, size in (("pair_weight", pair_weight, slots), ("group_offsets", group_offsets, num_groups + 1),
                          ("sorted_slot", sorted_slot, slots)):
        if t.shape[0] != size:
            raise ValueError(f"{name} must have {size} elements, got shape {tuple(t.shape)}")
    for name, t in (("grad_y", grad_y), ("topk_weights", topk_weights), ("pre_act", pre_act),
                    ("pair_weight", pair_weight), ("group_offsets", group_offsets), ("sorted_slot", sorted_slot),
                    ("pair_of_slot", pair_of_slot)):
        check_same_device(t, name, x, "x")
    check_choice(activation, "activation", ACTIVATIONS)
    check_bool(need_grad_x, "need_grad_x")
    check_bool(need_grad_weights, "need_grad_weights")
    if not isinstance(need_grad_stacks, (list, tuple)) or len(need_grad_stacks) != len(gate_up):
        raise ValueError(f"need_grad_stacks must hold one bool per stack ({len(gate_up)}), got {describe(need_grad_stacks)}")
    for i, need in enumerate(need_grad_stacks):
        check_bool(need, f"need_grad_stacks[{i}]")
    return num_groups


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
    num_groups = check_merged_moe_bwd(
        grad_y, x, topk_weights, gate_up, down, pre_act, pair_weight, group_offsets, sorted_slot,
        pair_of_slot, activation, need_grad_x, need_grad_weights, need_grad_stacks,
    )
    if _no_arithmetic(pair_of_slot.shape[1], num_groups, x.shape[1]):  # see merged_moe_fwd: all zero
        return (
            torch.zeros_like(x) if need_grad_x else x.new_empty(0),
            torch.zeros_like(topk_weights) if need_grad_weights else topk_weights.new_empty(0),
            [torch.zeros_like(w) if need else w.new_empty(0) for w, need in zip(gate_up, need_grad_stacks)],
            [torch.zeros_like(w) if need else w.new_empty(0) for w, need in zip(down, need_grad_stacks)],
        )
    _, impl = backends.resolve("merged_moe_bwd", x.device.type)
    keep = _nonempty_stacks(gate_up)
    grad_x, grad_w, kept_gate_up, kept_down = impl.merged_moe_bwd(
        grad_y, x, topk_weights, [gate_up[s] for s in keep], [down[s] for s in keep], pre_act, pair_weight,
        group_offsets, sorted_slot, pair_of_slot, activation, need_grad_x, need_grad_weights,
        [need_grad_stacks[s] for s in keep],
    )
    if len(keep) == len(gate_up):
        return grad_x, grad_w, kept_gate_up, kept_down
    # Put the 0-group stacks back: an empty gradient of their shape where one was requested.
    grad_gate_up = [torch.zeros_like(w) if need else w.new_empty(0) for w, need in zip(gate_up, need_grad_stacks)]
    grad_down = [torch.zeros_like(w) if need else w.new_empty(0) for w, need in zip(down, need_grad_stacks)]
    for j, s in enumerate(keep):
        grad_gate_up[s], grad_down[s] = kept_gate_up[j], kept_down[j]
    return grad_x, grad_w, grad_gate_up, grad_down


@merged_moe_bwd.register_fake
def _(grad_y, x, topk_weights, gate_up, down, pre_act, pair_weight, group_offsets, sorted_slot,
      pair_of_slot, activation, need_grad_x, need_grad_weights, need_grad_stacks):
    check_merged_moe_bwd(grad_y, x, topk_weights, gate_up, down, pre_act, pair_weight, group_offsets, sorted_slot,
                         pair_of_slot, activation, need_grad_x, need_grad_weights, need_grad_stacks)
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
