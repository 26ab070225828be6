"""merged_moe forward/backward: launchers and torch glue around flux_kernels.grouped_gemm.

Pairs (token, group) live at positions p < N of ``sorted_slot`` (sorted by group); every buffer
indexed by p has the static size T*k, and rows p >= N are never visited (tiles past a group's
rows are masked, tiles past the last group exit), so nothing here reads a data-dependent size on
the host.  Per token results are combined by a gather kernel over the token's k slots (a slot
counts iff it is the primary slot of its pair: ``sorted_slot[pair_of_slot[t, j]] == t*k + j``),
which keeps y and grad_x deterministic without float atomics.

Forward, per stack (stacks hold disjoint group ranges, one launch set each):
  pre_act = x[tok] @ gate_up[g]^T   -> epilogue writes pre_act and act = f(gate) * up
  out     = pair_weight * (act @ down[g]^T)      ([T*k, H] in x.dtype)
  y       = combine(out)
Backward:
  G       = grad_y[tok] @ down[g]    -> epilogue: d pre_act, act, partial <G, act> (grad of pair weight)
  grad_x  = combine(d_pre @ gate_up[g])
  grad_down[g]    = sum_p (pair_weight[p] grad_y[tok p])^T (x) act[p]
  grad_gate_up[g] = sum_p d_pre[p]^T (x) x[tok p]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flux.ops.backends import reference
from flux_kernels._common import INTERPRET, cdiv, round_to
from flux_kernels.grouped_gemm import (
    EPI_GLU_BWD, EPI_GLU_FWD, EPI_ROW_SCALE, EPI_STORE, MIN_BLOCK_N, grouped_mm, grouped_wgrad, tile_table,
)

_BLOCK = 64 if INTERPRET else 128  # 1-D blocks of the small gather kernels


@triton.jit
def _pair_weight_kernel(w_ptr, pos_ptr, slot_ptr, out_ptr, P, K, BLOCK: tl.constexpr):
    """out[p] = sum_j [pair_of_slot[t, j] == p] * topk_weights[t, j] (fp32, j ascending), t = slot[p] // k.
    Rows p >= N get 0: pair_of_slot only holds positions < N."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    base = (tl.load(slot_ptr + p, mask=mask, other=0) // K).to(tl.int64) * K
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(K):
        q = tl.load(pos_ptr + base + j, mask=mask, other=-1)
        w = tl.load(w_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(q == p, w, 0.0)
    tl.store(out_ptr + p, acc, mask=mask)


@triton.jit
def _combine_kernel(src_ptr, stride_src, pos_ptr, slot_ptr, out_ptr, stride_out, T, H, K,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum over the primary slots j of token t of src[pair_of_slot[t, j]] (fp32, j ascending)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in range(K):
        slot = offs_t * K + j
        p = tl.load(pos_ptr + slot, mask=mask_t, other=-1)
        primary = tl.load(slot_ptr + tl.maximum(p, 0), mask=p >= 0, other=-1) == slot
        v = tl.load(src_ptr + p.to(tl.int64)[:, None] * stride_src + offs_h[None, :],
                    mask=primary[:, None] & mask_h[None, :], other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_out + offs_h[None, :],
             round_to(acc, out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_h[None, :])


def _combine(src: torch.Tensor, pair_of_slot, sorted_slot, dtype) -> torch.Tensor:
    """[T*k, H] per-pair rows -> [T, H] in ``dtype``."""
    tokens, k = pair_of_slot.shape
    out = torch.empty(tokens, src.shape[1], dtype=dtype, device=src.device)
    block_t, block_h = (64, 64) if INTERPRET else (16, 128)
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(src.shape[1], block_h))
    _combine_kernel[grid](src, src.stride(0), pair_of_slot, sorted_slot, out, out.stride(0),
                          tokens, src.shape[1], k, BLOCK_T=block_t, BLOCK_H=block_h)
    return out


def _stacks(gate_up, group_offsets, num_pairs):
    """(stack index, first global group, tile table) per stack."""
    g0 = 0
    for s, w in enumerate(gate_up):
        yield s, g0, tile_table(group_offsets, g0, g0 + w.shape[0], num_pairs)
        g0 += w.shape[0]


def merged_moe_fwd(x, topk_weights, gate_up, down, group_offsets, sorted_slot, pair_of_slot, activation):
    """Contract: flux/ops/contracts.md#merged_moe_fwd.

    x [T, H] contiguous; topk_weights [T, k] fp32 or x.dtype; gate_up[s] [G_s, 2I, H], down[s]
    [G_s, H, I] contiguous in x.dtype; routing metadata from moe_routing.
    Returns y [T, H] x.dtype, pre_act [T*k, 2I] x.dtype (rows >= N zero), pair_weight fp32 [T*k].
    """
    if x.dtype == torch.float64:  # fp64 is an oracle dtype, not a kernel one
        return reference.merged_moe_fwd(x, topk_weights, gate_up, down, group_offsets, sorted_slot, pair_of_slot,
                                        activation)
    tokens, k = pair_of_slot.shape
    hidden, two_i = x.shape[1], gate_up[0].shape[1]
    inter = two_i // 2
    pairs = tokens * k
    pre_act = x.new_zeros(pairs, two_i)
    pair_weight = torch.empty(pairs, dtype=torch.float32, device=x.device)
    if pairs == 0:
        return x.new_zeros(tokens, hidden), pre_act, pair_weight
    _pair_weight_kernel[(triton.cdiv(pairs, _BLOCK),)](
        topk_weights, pair_of_slot, sorted_slot, pair_weight, pairs, k, BLOCK=_BLOCK)
    tok = torch.div(sorted_slot, k, rounding_mode="floor")  # int32 token of each pair position
    act = x.new_empty(pairs, inter)
    # per-pair rows in x.dtype: the same one rounding per pair as torch's matmul output
    out = x.new_empty(pairs, hidden)
    for s, _, table in _stacks(gate_up, group_offsets, pairs):
        w1, w2 = gate_up[s], down[s]
        # B[g][n, k] = gate_up[g][n, k] (n < I; the up rows are n + I)
        grouped_mm(x, tok, w1, (w1.stride(0), w1.stride(1), w1.stride(2)), pre_act, table, inter, hidden,
                   epi=EPI_GLU_FWD, d=act, glu_off=inter, activation=activation)
        grouped_mm(act, None, w2, (w2.stride(0), w2.stride(1), w2.stride(2)), out, table, hidden, inter,
                   epi=EPI_ROW_SCALE, scale=pair_weight)
    return _combine(out, pair_of_slot, sorted_slot, x.dtype), pre_act, pair_weight


def merged_moe_bwd(grad_y, x, topk_weights, gate_up, down, pre_act, pair_weight, group_offsets, sorted_slot,
                   pair_of_slot, activation, need_grad_x, need_grad_weights, need_grad_stacks):
    """Contract: flux/ops/contracts.md#merged_moe_bwd.

    grad_y [T, H] x.dtype, any strides.  Returns (grad_x [T, H] | numel 0, grad_topk_weights
    [T, k] in topk_weights.dtype | numel 0, grad_gate_up list, grad_down list); a stack whose
    need_grad_stacks entry is false gets a numel-0 tensor and no weight-gradient work.
    """
    if x.dtype == torch.float64:
        return reference.merged_moe_bwd(grad_y, x, topk_weights, gate_up, down, pre_act, pair_weight, group_offsets,
                                        sorted_slot, pair_of_slot, activation, need_grad_x, need_grad_weights,
                                        need_grad_stacks)
    tokens, k = pair_of_slot.shape
    hidden, two_i = x.shape[1], gate_up[0].shape[1]
    inter = two_i // 2
    pairs = tokens * k
    grad_gate_up = [torch.empty_like(w) if need else w.new_empty(0) for w, need in zip(gate_up, need_grad_stacks)]
    grad_down = [torch.empty_like(w) if need else w.new_empty(0) for w, need in zip(down, need_grad_stacks)]
    grad_x = x.new_zeros(tokens, hidden) if need_grad_x else x.new_empty(0)
    grad_w = torch.zeros_like(topk_weights) if need_grad_weights else topk_weights.new_empty(0)
    if pairs == 0 or not (need_grad_x or need_grad_weights or any(need_grad_stacks)):
        for g in grad_gate_up + grad_down:
            g.zero_()
        return grad_x, grad_w, grad_gate_up, grad_down

    tok = torch.div(sorted_slot, k, rounding_mode="floor")
    d_pre = x.new_empty(pairs, two_i)
    act = x.new_empty(pairs, inter) if any(need_grad_stacks) else None
    # partial <G, act> per MIN_BLOCK_N-wide column tile; rows a config does not write stay 0
    gpw = torch.zeros(cdiv(inter, MIN_BLOCK_N), pairs, dtype=torch.float32, device=x.device) \
        if need_grad_weights else None
    gx_pairs = x.new_empty(pairs, hidden) if need_grad_x else None
    for s, g0, table in _stacks(gate_up, group_offsets, pairs):
        w1, w2 = gate_up[s], down[s]
        # B[g][n, k] = down[g][k, n]: G = grad_y[tok] @ down[g]   ([*, H] @ [H, I])
        grouped_mm(grad_y, tok, w2, (w2.stride(0), w2.stride(2), w2.stride(1)), d_pre, table, inter, hidden,
                   epi=EPI_GLU_BWD, d=act if need_grad_stacks[s] else None, pre=pre_act, scale=pair_weight,
                   f=gpw, glu_off=inter, activation=activation)
        if need_grad_x:  # B[g][n, k] = gate_up[g][k, n]: d_pre @ gate_up[g]   ([*, 2I] @ [2I, H])
            grouped_mm(d_pre, None, w1, (w1.stride(0), w1.stride(2), w1.stride(1)), gx_pairs, table, hidden,
                       two_i, epi=EPI_STORE)
        if need_grad_stacks[s]:
            grouped_wgrad(grad_y, tok, act, None, grad_down[s], group_offsets, g0, scale=pair_weight)
            grouped_wgrad(d_pre, None, x, tok, grad_gate_up[s], group_offsets, g0)
    if need_grad_x:
        grad_x = _combine(gx_pairs, pair_of_slot, sorted_slot, x.dtype)
    if need_grad_weights:
        per_pair = gpw.sum(0)
        pos = pair_of_slot.long()
        grad_w = torch.where(pos >= 0, per_pair[pos.clamp(min=0)], 0.0).to(topk_weights.dtype)
    return grad_x, grad_w, grad_gate_up, grad_down
