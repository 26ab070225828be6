"""Shared wrappers of the native ops (torch.ops.flux_C): the cpp and cuda backends."""
from __future__ import annotations

import torch
from torch import Tensor

from flux._extension import load

_loaded, _why = load()
UNAVAILABLE_REASON = None if _loaded else _why


def quantize(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    return torch.ops.flux_C.quantize(w, bits, group_size)


def dequantize(
    qdata: Tensor, scales: Tensor, bits: int, group_size: int, cols: int, dtype: torch.dtype
) -> Tensor:
    return torch.ops.flux_C.dequantize(qdata, scales, bits, group_size, cols, dtype)


def route_profile(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts):
    return torch.ops.flux_C.route_profile(
        x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts
    )


def moe_routing(topk_ids: Tensor, expert_to_group: Tensor, num_groups: int):
    return torch.ops.flux_C.moe_routing(topk_ids, expert_to_group, num_groups)


def merged_moe_fwd(x, topk_weights, gate_up, down, group_offsets, sorted_slot, pair_of_slot, activation):
    return torch.ops.flux_C.merged_moe_fwd(
        x, topk_weights, gate_up, down, group_offsets, sorted_slot, pair_of_slot, activation
    )


def merged_moe_bwd(*args):
    return torch.ops.flux_C.merged_moe_bwd(*args)
