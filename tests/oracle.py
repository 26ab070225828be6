"""Test oracles: naive loops in any dtype, and the relative-to-PyTorch error rule.

The naive MoE loop runs every routed slot separately (no de-duplication, no sorting), which is
exactly the semantics merged_moe must reproduce; computed in fp64 it is the ground truth, and
computed in a low dtype it measures "PyTorch's own error" in that dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_merged_moe(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    expert_to_group: Tensor,
    activation: str = "silu",
) -> Tensor:
    """y [T, H] = sum over slots (t, j) with group g >= 0 of w[t, j] * down[g] @ act(gate_up[g] @ x[t])."""
    groups = expert_to_group.long()[topk_ids.long()]
    # Zero term keeps every input in the graph, so grads of unused inputs are 0, not None.
    y = x * 0 + (gate_up.sum() + down.sum() + topk_weights.sum()).to(x.dtype) * 0
    for g in range(gate_up.shape[0]):
        for j in range(topk_ids.shape[1]):
            rows = (groups[:, j] == g).nonzero().flatten()
            if rows.numel() == 0:
                continue
            h = x[rows] @ gate_up[g].t()
            gate, up = h.chunk(2, dim=-1)
            act = (F.silu(gate) if activation == "silu" else F.gelu(gate)) * up
            out = act @ down[g].t()
            y = y.index_add(0, rows, out * topk_weights[rows, j].to(x.dtype).unsqueeze(1))
    return y


def naive_route(x: Tensor, gate_dense: Tensor, top_k: int, scoring: str, renormalize: bool):
    """fp64 logits and scores of the router (ground truth for route_profile)."""
    logits = x.double() @ gate_dense.double().t()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    return logits, scores


def rel_err(a: Tensor, ref: Tensor) -> float:
    """Relative Frobenius error of a against ref (0 when both are empty or zero)."""
    a, ref = a.double(), ref.double()
    denom = ref.norm().item()
    diff = (a - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_to_oracle(out: Tensor, torch_same_dtype: Tensor, ref64: Tensor, name: str, factor: float = 2.0) -> None:
    """The kernel's error against fp64 may be at most ``factor`` x plain PyTorch's error in the
    same dtype (plus a floor for when PyTorch happens to be exact)."""
    floor = {torch.float32: 1e-6, torch.float64: 1e-12}.get(out.dtype, 2e-3)
    kernel_err = rel_err(out, ref64)
    torch_err = rel_err(torch_same_dtype, ref64)
    assert kernel_err <= factor * torch_err + floor, (
        f"{name}: error {kernel_err:.3e} vs fp64 exceeds {factor} x PyTorch's own error "
        f"{torch_err:.3e} in {out.dtype} (+{floor:g})"
    )
