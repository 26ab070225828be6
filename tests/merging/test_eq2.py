"""Eq. 2 has one implementation (flux.merging.merge.merge_cluster, float64 accumulation): the
layer handle's merged groups and the merge planner's stacks are that function's output."""
from __future__ import annotations

import torch

import flux
from flux.merging.merge import merge_cluster, merge_experts
from tests.moe.helpers import tiny_mixtral


def test_handle_merged_groups_equal_merge_cluster_bitwise():
    model = tiny_mixtral(seed=3)
    handle = flux.patch(model)
    layer = handle.moe_layers[0]
    e = layer.num_experts
    alpha = torch.rand(e, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    assert e >= 4
    clusters = [[1, 2], list(range(3, e))]
    layout = layer.merged_groups([0], clusters, weights=alpha)
    for c, members in enumerate(clusters):
        ws = [layer.expert_weights(i) for i in members]
        assert torch.equal(layout["gate_up"][1 + c], merge_cluster([w.gate_up for w in ws], alpha[members]))
        assert torch.equal(layout["down"][1 + c], merge_cluster([w.down for w in ws], alpha[members]))


def test_merge_experts_is_merge_cluster_per_cluster():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, 3, generator=g)
    clusters = torch.tensor([0, 1, 0, -1, 1, 1, 0])
    alpha = torch.rand(7, generator=g)
    out = merge_experts(w, clusters, alpha)
    for c in range(2):
        members = (clusters == c).nonzero().flatten()
        assert torch.equal(out[c], merge_cluster([w[i] for i in members], alpha[members]))


def test_float64_accumulation_rounds_once():
    """Many members of wide dynamic range: the merge equals the float64 sum rounded once to
    float32, while float32 accumulation drifts from it."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(4096, generator=g) * 10.0 ** float(k % 7) for k in range(64)]
    alpha = torch.rand(64, generator=g, dtype=torch.float64)
    coef = (alpha / alpha.sum()).tolist()
    ref64 = torch.zeros(4096, dtype=torch.float64)
    acc32 = torch.zeros(4096, dtype=torch.float32)
    for w, c in zip(ws, coef):
        ref64.add_(w.double(), alpha=c)
        acc32.add_(w, alpha=c)
    got = merge_cluster(ws, alpha)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref64.float())
    assert (acc32.double() - ref64).abs().max() > (got.double() - ref64).abs().max()


def test_float64_accumulation_survives_cancellation():
    """Ill-conditioned Eq. 2: two large members that cancel plus a small one.  The exact result
    is small; float32 accumulation keeps only the rounding error of the large partial sums."""
    g = torch.Generator().manual_seed(1)
    big = (torch.rand(2048, generator=g) + 1.0) * 2.0**23  # exact in float32
    small = torch.randn(2048, generator=g)
    ws = [big, -(big - 1.0), small]  # exact in float32; w0 + w1 = 1
    alpha = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    exact = (1.0 + small.double()) / 3.0
    acc32 = torch.zeros(2048)
    for w in ws:
        acc32.add_(w, alpha=1.0 / 3.0)
    got = merge_cluster(ws, alpha)
    assert got.dtype == torch.float32
    # float64 partial sums (~3e6) carry ~1e-9 absolute: the result is the exact value rounded to
    # float32 (<= 1 ulp) up to that
    tol = torch.finfo(torch.float32).eps * exact.abs() + 1e-8
    assert bool(((got.double() - exact).abs() <= tol).all())
    assert (acc32.double() - exact).abs().max().item() > 0.1  # float32 partial sums: ~0.25 absolute error
    # merge_experts (the planner's stacks) accumulates the same way
    out = merge_experts(torch.stack(ws), torch.tensor([0, 0, 0]), alpha)
    assert torch.equal(out[0], got)



def test_handle_merged_bias_groups_equal_merge_cluster_bitwise():
    """Biased experts: the handle's merged biases are Eq. 2 (merge_cluster) of the members' biases."""
    from tests.moe.test_variants import E, _block

    handle = flux.patch(_block(transposed=False, interleaved=False, bias=True))
    layer = handle.moe_layers[0]
    assert layer.native and layer.source.has_bias
    alpha = torch.rand(E, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.1
    clusters = [[1, 3], [2, 4]]
    layout = layer.merged_groups([0], clusters, weights=alpha)
    for c, members in enumerate(clusters):
        ws = [layer.expert_weights(i) for i in members]
        assert torch.equal(layout["gate_up"][1 + c], merge_cluster([w.gate_up for w in ws], alpha[members]))
        assert torch.equal(layout["gate_up_bias"][1 + c], merge_cluster([w.gate_up_bias for w in ws], alpha[members]))
        assert torch.equal(layout["down_bias"][1 + c], merge_cluster([w.down_bias for w in ws], alpha[members]))
