"""Fused router: (de)quantized gate matmul + scoring + top-k + expert histogram, one pass over x.

One program handles BLOCK_T tokens and all E experts (E padded to a power of two, E <= 256), so
the logits tile [BLOCK_T, E_PAD] never leaves registers; x is read exactly once.  Larger E falls
back to the pure-torch reference (a second "split over E" pass would be needed for top-k).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flux.ops.backends import reference
from flux_kernels._common import INTERPRET, dot_precision

MAX_EXPERTS = 256


@triton.jit
def _route_profile_kernel(
    x_ptr, stride_xt,            # x [T, H] (row stride; unit column stride), fp32/bf16/fp16
    gate_ptr, stride_ge,         # dense [E, H] float, int8 [E, H] or packed uint8 [E, ceil(H/2)]
    scales_ptr, stride_se,       # fp32 [E, n_groups] (unused when BITS == 0)
    w_out_ptr, id_out_ptr,       # fp32 / int32 [T, top_k]
    counts_ptr,                  # int64 [E], accumulated
    T, H, E, top_k, group_size,
    BITS: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr, PRECISION: tl.constexpr,
    E_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_e = tl.arange(0, E_PAD)
    mask_e = offs_e < E

    # ---- logits [BLOCK_T, E_PAD] = x @ W^T in fp32, W dequantized in registers
    logits = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_h[None, :],
                    mask=mask_t[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        w_mask = mask_h[:, None] & mask_e[None, :]  # W^T tile [BLOCK_H, E_PAD]
        row = offs_e[None, :] * stride_ge
        if BITS == 0:
            w = tl.load(gate_ptr + row + offs_h[:, None], mask=w_mask, other=0.0).to(tl.float32)
        else:
            if BITS == 8:
                q = tl.load(gate_ptr + row + offs_h[:, None], mask=w_mask, other=0).to(tl.int32)
            else:  # column h sits in byte h//2: low nibble for even h, high for odd; stored q+8
                byte = tl.load(gate_ptr + row + (offs_h // 2)[:, None], mask=w_mask, other=0).to(tl.int32)
                q = ((byte >> ((offs_h % 2) * 4)[:, None]) & 15) - 8
            s = tl.load(scales_ptr + offs_e[None, :] * stride_se + (offs_h // group_size)[:, None],
                        mask=w_mask, other=0.0)
            w = q.to(tl.float32) * s
        logits = tl.dot(x, w, logits, input_precision=PRECISION)

    # ---- top-k: k rounds of "max, then the lowest index holding it" (stable, lower index wins)
    logits = tl.where(mask_e[None, :], logits, float("-inf"))
    avail = mask_e[None, :] & (offs_t[:, None] >= 0)  # [BLOCK_T, E_PAD]
    offs_k = tl.arange(0, K_PAD)
    sel_id = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    sel_logit = tl.full((BLOCK_T, K_PAD), float("-inf"), dtype=tl.float32)
    for j in range(top_k):
        cand = tl.where(avail, logits, float("-inf"))
        m = tl.max(cand, axis=1)
        idx = tl.min(tl.where(avail & (cand == m[:, None]), offs_e[None, :], E_PAD), axis=1)
        # a NaN row matches nothing: take the lowest free expert so ids stay in range
        idx = tl.where(idx == E_PAD, tl.min(tl.where(avail, offs_e[None, :], E_PAD), axis=1), idx)
        avail = avail & (offs_e[None, :] != idx[:, None])
        sel_id = tl.where(offs_k[None, :] == j, idx[:, None], sel_id)
        sel_logit = tl.where(offs_k[None, :] == j, m[:, None], sel_logit)

    # ---- scores of the chosen experts (softmax over all E, or sigmoid), optional renormalization
    if SOFTMAX:
        row_max = tl.max(logits, axis=1)
        denom = tl.sum(tl.exp(logits - row_max[:, None]), axis=1)  # padded experts: exp(-inf) = 0
        score = tl.exp(sel_logit - row_max[:, None]) / denom[:, None]
    else:
        score = 1.0 / (1.0 + tl.exp(-sel_logit))
    mask_k = offs_k[None, :] < top_k
    score = tl.where(mask_k, score, 0.0)
    if RENORM:
        score = score / tl.sum(score, axis=1)[:, None]
    out_off = offs_t.to(tl.int64)[:, None] * top_k + offs_k[None, :]
    out_mask = mask_t[:, None] & mask_k
    tl.store(w_out_ptr + out_off, score, mask=out_mask)
    tl.store(id_out_ptr + out_off, sel_id, mask=out_mask)

    # ---- histogram: this program's tokens per expert, one int64 atomic per expert hit
    chosen = mask_t[:, None] & mask_e[None, :] & (avail == 0)
    hist = tl.sum(chosen.to(tl.int32), axis=0).to(tl.int64)
    tl.atomic_add(counts_ptr + offs_e, hist, mask=mask_e & (hist > 0))


def route_profile(x, gate, gate_scales, gate_bits, group_size, top_k, scoring, renormalize, counts):
    """Contract: flux/ops/contracts.md#route_profile.

    x: [T, H] contiguous fp32/bf16/fp16; gate: dense float [E, H], int8 [E, H] or packed uint8
    [E, ceil(H/2)] (gate_bits 0/8/4) with fp32 gate_scales [E, n_groups]; counts: int64 [E],
    incremented in place.  Returns (fp32 [T, top_k] weights, int32 [T, top_k] ids).
    """
    tokens, hidden = x.shape
    num_experts = gate.shape[0]
    if num_experts > MAX_EXPERTS:  # logits tile would not fit in registers
        return reference.route_profile(x, gate, gate_scales, gate_bits, group_size, top_k, scoring,
                                       renormalize, counts)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=x.device)
    if tokens == 0:
        return weights, ids
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    scales = gate if gate_bits == 0 else gate_scales.contiguous()
    e_pad = max(16, triton.next_power_of_2(num_experts))
    if INTERPRET:  # big tiles: the interpreter's cost is per operation, not per element
        block_t, block_h, warps, stages = 64, 128, 4, 1
    else:  # sized from sm_90 compiles so that nothing spills (<= ~128 registers per thread)
        block_t = 64 if e_pad <= 32 else (32 if e_pad <= 128 else 16)
        block_h, warps, stages = (64 if e_pad <= 64 else 32), 8, 2
    grid = (triton.cdiv(tokens, block_t),)
    _route_profile_kernel[grid](
        x, x.stride(0), gate, gate.stride(0), scales, scales.stride(0), weights, ids, counts,
        tokens, hidden, num_experts, top_k, max(int(group_size), 1),
        BITS=int(gate_bits), SOFTMAX=scoring == "softmax", RENORM=bool(renormalize),
        PRECISION=dot_precision(torch.float32), E_PAD=e_pad, K_PAD=max(2, triton.next_power_of_2(top_k)),
        BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps, num_stages=stages,
    )
    return weights, ids
