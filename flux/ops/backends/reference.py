"""Pure-PyTorch backend: the readable statement of every op (flux/ops/contracts.md).

It runs on any device, builds routing metadata without host synchronisation (so the GPU
backends reuse :func:`moe_routing`), and computes in the input dtype the way plain PyTorch
would, which makes it the "PyTorch's own error" yardstick of the low-precision tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

QMAX = {4: 7, 8: 127}


# ----------------------------------------------------------------------------- quantization
def quantize(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    rows, cols = w.shape
    n_groups = math.ceil(cols / group_size) if cols else 0
    padded = n_groups * group_size
    wf = F.pad(w.float(), (0, padded - cols)).view(rows, n_groups, group_size)
    scales = wf.abs().amax(dim=-1) / QMAX[bits]  # amax propagates NaN
    # A group holding NaN / Inf has a non-finite scale: q = 0 there (casting NaN to an integer
    # is undefined), so it dequantizes to NaN (0 * NaN, 0 * Inf).
    finite = torch.isfinite(scales)
    safe = torch.where((scales > 0) & finite, scales, torch.ones_like(scales))
    q = torch.round(wf / safe.unsqueeze(-1)).clamp_(-QMAX[bits], QMAX[bits])
    q = torch.where(finite.unsqueeze(-1), q, torch.zeros_like(q))
    q = q.view(rows, padded)[:, :cols]
    if bits == 8:
        return q.to(torch.int8).contiguous(), scales
    nib = (q + 8).to(torch.uint8)
    if cols % 2:
        nib = F.pad(nib, (0, 1), value=8)
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return packed.contiguous(), scales


def unpack_int4(qdata: Tensor, cols: int) -> Tensor:
    """uint8 [R, ceil(cols/2)] -> int8 [R, cols] with values in [-8, 7]."""
    low = (qdata & 0x0F).to(torch.int8) - 8
    high = (qdata >> 4).to(torch.int8) - 8
    # explicit sizes: view(R, -1) is ambiguous when R = 0
    return torch.stack((low, high), dim=-1).view(qdata.shape[0], 2 * qdata.shape[1])[:, :cols]


def dequantize(
    qdata: Tensor, scales: Tensor, bits: int, group_size: int, cols: int, dtype: torch.dtype
) -> Tensor:
    q = qdata if bits == 8 else unpack_int4(qdata, cols)
    col_scale = scales.repeat_interleave(group_size, dim=1)[:, :cols]
    return (q.float() * col_scale).to(dtype)


# ----------------------------------------------------------------------------- routing
def route_profile(
    x: Tensor,
    gate: Tensor,
    gate_scales: Tensor | None,
    gate_bits: int,
    group_size: int,
    top_k: int,
    scoring: str,
    renormalize: bool,
    counts: Tensor,
) -> tuple[Tensor, Tensor]:
    if gate_bits:
        w = dequantize(gate, gate_scales, gate_bits, group_size, x.shape[1], torch.float32)
    else:
        w = gate.float()
    logits = x.float() @ w.t()
    # A stable descending sort keeps the lower index first among equal logits.
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts.add_(torch.zeros_like(counts).scatter_add_(0, ids.flatten(), torch.ones_like(ids.flatten())))
    return weights.contiguous(), ids.to(torch.int32).contiguous()


def moe_routing(
    topk_ids: Tensor, expert_to_group: Tensor, num_groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    tokens, k = topk_ids.shape
    groups = expert_to_group.long()[topk_ids.long()]  # [T, k]
    same = groups.unsqueeze(2) == groups.unsqueeze(1)  # [T, k, k]: slot j vs slot j'
    first_slot = same.int().argmax(dim=2)  # lowest j' with the same group (argmax: first max)
    slot_index = torch.arange(k, device=topk_ids.device)
    primary = (groups >= 0) & (first_slot == slot_index)
    key = torch.where(primary, groups, torch.full_like(groups, num_groups)).flatten()
    sorted_slot = torch.sort(key, stable=True).indices  # stable: ties keep slot order
    sizes = torch.zeros(num_groups + 1, dtype=torch.int64, device=topk_ids.device)
    sizes.scatter_add_(0, key, torch.ones_like(key))
    group_offsets = torch.cat((sizes.new_zeros(1), sizes[:num_groups].cumsum(0)))
    position = torch.empty_like(sorted_slot)
    position[sorted_slot] = torch.arange(tokens * k, device=topk_ids.device)
    token_base = torch.arange(tokens, device=topk_ids.device).unsqueeze(1) * k
    pair_of_slot = position[(token_base + first_slot).flatten()].view(tokens, k)
    pair_of_slot = torch.where(groups >= 0, pair_of_slot, torch.full_like(pair_of_slot, -1))
    return group_offsets, sorted_slot.to(torch.int32), pair_of_slot.to(torch.int32)


# ----------------------------------------------------------------------------- merged MoE
def _stack_of_group(stacks: list[Tensor]) -> list[tuple[Tensor, int]]:
    """(stack tensor, index inside it) for every global group index."""
    return [(stack, i) for stack in stacks for i in range(stack.shape[0])]


def _activation(pre: Tensor, activation: str) -> Tensor:
    gate, up = pre.chunk(2, dim=-1)
    return (F.silu(gate) if activation == "silu" else F.gelu(gate)) * up


def pair_weights(topk_weights: Tensor, pair_of_slot: Tensor) -> Tensor:
    """fp32 [T*k]: summed routing weight of each pair (duplicates of a group add up)."""
    flat = pair_of_slot.flatten().long()
    valid = flat >= 0
    out = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    return out.index_put_((flat[valid],), topk_weights.flatten().float()[valid], accumulate=True)


def _pairs_by_group(group_offsets: Tensor) -> list[tuple[int, int]]:
    bounds = group_offsets.tolist()  # host sync: acceptable for the reference backend
    return list(zip(bounds[:-1], bounds[1:]))


def merged_moe_fwd(
    x: Tensor,
    topk_weights: Tensor,
    gate_up: list[Tensor],
    down: list[Tensor],
    group_offsets: Tensor,
    sorted_slot: Tensor,
    pair_of_slot: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    tokens, k = pair_of_slot.shape
    two_i = gate_up[0].shape[1]
    pair_weight = pair_weights(topk_weights, pair_of_slot)
    pre_act = x.new_zeros(tokens * k, two_i)
    out = torch.zeros(tokens * k, x.shape[1], dtype=torch.float32, device=x.device)
    token_of_pair = sorted_slot.long() // k
    for (w1, i1), (w2, i2), (lo, hi) in zip(
        _stack_of_group(gate_up), _stack_of_group(down), _pairs_by_group(group_offsets)
    ):
        if hi == lo:
            continue
        xs = x[token_of_pair[lo:hi]]
        pre_act[lo:hi] = xs @ w1[i1].t()
        out[lo:hi] = (_activation(pre_act[lo:hi], activation) @ w2[i2].t()).float()
    y = _combine(out * pair_weight.unsqueeze(1), pair_of_slot)
    return y.to(x.dtype), pre_act, pair_weight


def _combine(per_pair: Tensor, pair_of_slot: Tensor) -> Tensor:
    """[T*k, H] per-pair rows -> [T, H]: each token sums its pairs once (primary slots only)."""
    tokens, k = pair_of_slot.shape
    pos = pair_of_slot.long()
    first = torch.ones_like(pos, dtype=torch.bool)
    for j in range(1, k):  # a duplicate slot points at the same pair as an earlier slot
        first[:, j] = (pos[:, :j] != pos[:, j : j + 1]).all(dim=1)
    use = (pos >= 0) & first
    padded = torch.cat((per_pair, per_pair.new_zeros(1, per_pair.shape[1])))
    rows = torch.where(use, pos, torch.full_like(pos, per_pair.shape[0]))
    return padded[rows].sum(dim=1) if tokens else per_pair.new_zeros(0, per_pair.shape[1])


def _activation_backward(pre: Tensor, grad_act: Tensor, activation: str) -> Tensor:
    gate, up = pre.float().chunk(2, dim=-1)
    if activation == "silu":
        sig = torch.sigmoid(gate)
        f = gate * sig
        df = sig * (1 + gate * (1 - sig))
    else:
        f = F.gelu(gate)
        df = 0.5 * (1 + torch.erf(gate / math.sqrt(2))) + gate * torch.exp(-0.5 * gate * gate) / math.sqrt(
            2 * math.pi
        )
    return torch.cat((grad_act * up * df, grad_act * f), dim=-1)


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
    tokens, k = pair_of_slot.shape
    token_of_pair = sorted_slot.long() // k
    grad_x_pairs = torch.zeros(tokens * k, x.shape[1], dtype=torch.float32, device=x.device)
    grad_pair_weight = torch.zeros(tokens * k, dtype=torch.float32, device=x.device)
    grad_gate_up = [torch.zeros_like(w) if need else w.new_empty(0) for w, need in zip(gate_up, need_grad_stacks)]
    grad_down = [torch.zeros_like(w) if need else w.new_empty(0) for w, need in zip(down, need_grad_stacks)]
    stack_of = [s for s, w in enumerate(gate_up) for _ in range(w.shape[0])]
    for g, ((w1, i1), (w2, i2), (lo, hi)) in enumerate(
        zip(_stack_of_group(gate_up), _stack_of_group(down), _pairs_by_group(group_offsets))
    ):
        if hi == lo:
            continue
        s = stack_of[g]
        rows = token_of_pair[lo:hi]
        dy = grad_y[rows]
        pre = pre_act[lo:hi]
        act = _activation(pre, activation)
        g_act = (dy @ w2[i2]).float()  # [n, I] = grad of the unweighted expert output
        grad_pair_weight[lo:hi] = (g_act * act.float()).sum(dim=1)
        d_act = g_act * pair_weight[lo:hi].unsqueeze(1)
        d_pre = _activation_backward(pre, d_act, activation).to(x.dtype)
        if need_grad_x:
            grad_x_pairs[lo:hi] = (d_pre @ w1[i1]).float()
        if need_grad_stacks[s]:
            weighted_dy = (dy.float() * pair_weight[lo:hi].unsqueeze(1)).to(x.dtype)
            grad_down[s][i2] = weighted_dy.t() @ act
            grad_gate_up[s][i1] = d_pre.t() @ x[rows]
    grad_x = _combine(grad_x_pairs, pair_of_slot).to(x.dtype) if need_grad_x else x.new_empty(0)
    if need_grad_weights:
        pos = pair_of_slot.long()
        gathered = grad_pair_weight[pos.clamp(min=0)]
        grad_w = torch.where(pos >= 0, gathered, torch.zeros_like(gathered)).to(topk_weights.dtype)
    else:
        grad_w = topk_weights.new_empty(0)
    return grad_x, grad_w, grad_gate_up, grad_down
