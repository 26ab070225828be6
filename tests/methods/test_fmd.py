"""FMD: offload plan (what stays, what moves), byte count of a run, numerics equal to fedavg."""
from __future__ import annotations

import pytest
import torch

from flux.methods.fedavg import FedAvg
from flux.methods.fmd import FMD, plan_offload
from flux.moe import estimate_memory
from tests.methods import EXPERTS, LAYERS, expert_bytes, global_experts, tiny_context


def _full(work) -> int:
    return estimate_memory(work.handle, None, optimizer="adamw", train_experts=True,
                           trainable=list(work.model.head.parameters())).total


def test_everything_fits_moves_nothing():
    ctx, work = tiny_context()
    dense = list(work.model.head.parameters())
    plan = plan_offload(work.handle, _full(work), dense)
    assert plan.num_offloaded == 0 and plan.bytes_per_step == 0 and plan.staging_bytes == 0
    assert plan.resident_bytes == _full(work)


def test_plan_keeps_a_prefix_and_offloads_exactly_the_rest():
    ctx, work = tiny_context()
    dense = list(work.model.head.parameters())
    w = expert_bytes()
    state = 4 * w  # W + G + exp_avg + exp_avg_sq, fp32
    probe = plan_offload(work.handle, _full(work) - 1, dense)
    fixed = probe.fixed_bytes
    assert fixed + LAYERS * EXPERTS * state == _full(work)
    kept = 5
    budget = fixed + state + kept * state + state - 1  # staging slot + 5 experts + not quite a 6th
    plan = plan_offload(work.handle, budget, dense)
    assert plan.resident == (tuple(range(kept)), ())
    assert plan.offloaded == (tuple(range(kept, EXPERTS)), tuple(range(EXPERTS)))
    assert plan.resident_bytes == fixed + state * (kept + 1) <= budget
    n_off = LAYERS * EXPERTS - kept
    # forward: W in; fused backward + AdamW: W, m, v in and out
    assert plan.bytes_down_per_step == n_off * 4 * w
    assert plan.bytes_up_per_step == n_off * 3 * w
    assert plan.host_bytes == n_off * 3 * w


def test_too_little_memory_names_the_minimum():
    ctx, work = tiny_context()
    dense = list(work.model.head.parameters())
    need = plan_offload(work.handle, _full(work) - 1, dense)
    minimum = need.fixed_bytes + need.staging_bytes
    with pytest.raises(ValueError, match=str(minimum)):
        plan_offload(work.handle, minimum - 1, dense)
    with pytest.raises(ValueError, match="memory_bytes"):
        plan_offload(work.handle, -1, dense)


def test_local_update_counts_bytes_and_trains_like_fedavg():
    torch.set_num_threads(1)
    steps = 3
    ctx, work = tiny_context(steps=steps)
    budget = _full(work) // 2
    ctx.devices[0].memory_bytes = budget
    before = global_experts(work.handle)
    head_before = work.model.head.weight.detach().clone()

    fmd = FMD()
    fmd.setup(ctx)
    up = fmd.local_update(ctx, 0, 0, None, None)
    ref = FedAvg().local_update(ctx, 0, 0, None, None)

    plan = fmd.plans[0]
    assert plan.num_offloaded > 0
    assert up.costs.offload_bytes == steps * 7 * expert_bytes() * plan.num_offloaded
    assert up.costs.peak_memory_bytes <= budget
    # the global model is untouched
    for (gu0, dn0), (gu1, dn1) in zip(before, global_experts(work.handle)):
        assert torch.equal(gu0, gu1) and torch.equal(dn0, dn1)
    assert torch.equal(head_before, work.model.head.weight)
    # all experts train, exactly as fedavg
    assert up.expert_deltas.keys() == ref.expert_deltas.keys() and len(up.expert_deltas) > 0
    for key, d in up.expert_deltas.items():
        assert torch.equal(d["gate_up"], ref.expert_deltas[key]["gate_up"])
        assert torch.equal(d["down"], ref.expert_deltas[key]["down"])
    assert any(d["gate_up"].abs().max() > 0 for d in up.expert_deltas.values())


@pytest.mark.gpu
def test_cuda_moves_the_planned_bytes_through_pinned_memory():
    steps = 2
    ctx, work = tiny_context(steps=steps)
    budget = _full(work) // 2
    ctx.devices[0].memory_bytes = budget
    work.model.cuda()
    for data in work.train:
        for name in ("input_ids", "attention_mask", "labels"):
            setattr(data, name, getattr(data, name).cuda())
    fmd = FMD()
    fmd.setup(ctx)
    up = fmd.local_update(ctx, 0, 0, None, None)
    plan = fmd.plans[0]
    assert up.costs.offload_bytes == steps * plan.bytes_per_step > 0
    assert up.costs.extra["offload_measured_s"] > 0
