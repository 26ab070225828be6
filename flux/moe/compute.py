"""The expert computation of a patched layer: one call of ``flux.ops.merged_moe``.

Stacks come as lists (``[trainable, frozen]`` under a merged view, ``[all experts]`` otherwise),
in the transformers 5.x layout: gate_up [G, 2I, H] (rows [0, I) gate), down [G, H, I].

Biased experts (``h = W1 x + b1``, ``y = W2 act(h) + b2``), which the op does not take, are
computed exactly:

* ``b1`` rides on a constant input feature: x' = [x, 1] (H+1 wide), W1' = [W1 | b1], and the
  down stacks get one zero output row so that y' = [y, 0]; the extra column is dropped.
* ``b2`` is linear in the routing weight, so it is the small extra term
  ``sum_j w_j * b2[group(e_j)]`` (dropped experts contribute nothing).

Both are differentiable, so biases train like weights.  The cost is one concatenated copy of the
stacks per call, which is why unbiased layers take the zero-copy path.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

import flux.ops
from flux.ops import QuantizedTensor

Stack = Union[Tensor, QuantizedTensor]


def _dense(stack: Stack, dtype: torch.dtype) -> Tensor:
    return stack.dequantize(dtype) if isinstance(stack, QuantizedTensor) else stack


def run_experts(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up: Sequence[Stack],
    down: Sequence[Stack],
    expert_to_group: Tensor,
    activation: str,
    gate_up_bias: Optional[Sequence[Tensor]] = None,
    down_bias: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """y [T, H] in x.dtype: sum_j w_j * expert_{e_j}(x) with experts served by their groups."""
    out_dtype = x.dtype
    if len(gate_up) == 0:  # every expert dropped
        return x.new_zeros(x.shape)
    first = gate_up[0]
    w_dtype = first.dtype
    x = x.to(w_dtype)
    if topk_weights.dtype not in (torch.float32, w_dtype):
        topk_weights = topk_weights.float()
    if gate_up_bias is None:
        stacks_gu = [s if isinstance(s, QuantizedTensor) else s.contiguous() for s in gate_up]
        stacks_dn = [s if isinstance(s, QuantizedTensor) else s.contiguous() for s in down]
        y = flux.ops.merged_moe(x, topk_ids, topk_weights, stacks_gu, stacks_dn, expert_to_group,
                                activation=activation)
        return y.to(out_dtype)

    hidden = x.shape[1]
    x_aug = torch.cat((x, x.new_ones(x.shape[0], 1)), dim=1)
    stacks_gu, stacks_dn = [], []
    for gu, dn, b1 in zip(gate_up, down, gate_up_bias):
        gu = _dense(gu, w_dtype)
        dn = _dense(dn, w_dtype)
        stacks_gu.append(torch.cat((gu, b1.to(w_dtype).unsqueeze(-1)), dim=2))
        stacks_dn.append(torch.cat((dn, dn.new_zeros(dn.shape[0], 1, dn.shape[2])), dim=1))
    y = flux.ops.merged_moe(x_aug, topk_ids, topk_weights, stacks_gu, stacks_dn, expert_to_group,
                            activation=activation)[:, :hidden]
    if down_bias is not None:
        groups = expert_to_group.long()[topk_ids.long()]  # [T, k]
        extra = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        offset = 0
        for b2 in down_bias:  # per stack (no cat: each bias gets a gradient of its own size)
            local = groups - offset
            inside = (local >= 0) & (local < b2.shape[0])
            w = topk_weights.float() * inside
            extra = extra + (b2.float()[local.clamp(0, b2.shape[0] - 1)] * w.unsqueeze(-1)).sum(dim=1)
            offset += b2.shape[0]
        y = y + extra.to(y.dtype)
    return y.to(out_dtype)
