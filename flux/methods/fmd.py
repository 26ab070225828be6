"""FMD: every expert trains; what does not fit in device memory is offloaded to host memory.

Memory model (docs/baselines.md has the worked formulas).  With AdamW, one expert of layer l
carries ``w_l`` bytes of weights (W), ``w_l`` of gradient (G) and ``2 w_l`` of moments (m, v):
``s_l = 4 w_l``, all read from :func:`flux.moe.estimate_memory` (the drop-in layer's exact
accounting).  ``fixed`` is everything else the full training layout holds (non-expert weights
and their training state, routing counts, the optimizer's per-parameter step scalars).

* Everything fits (``full <= budget``): nothing moves, exactly like fedavg.
* Otherwise the device holds ``fixed``, one *staging slot* of ``max_l s_l`` bytes (the expert
  being streamed: its W, G, m, v) and as many experts' full state as fit in the rest, taken in
  (layer, expert) order; the other experts' W, m, v live in (pinned) host memory.

Transfer schedule per local step, for every offloaded expert (the optimizer step is fused into
the backward pass: as soon as a layer's backward has produced an expert's gradient, that expert
is updated on the device, so its gradient never crosses the link):

============================  ===============  ===============
phase                          host -> device   device -> host
============================  ===============  ===============
forward of its layer           W (w_l)          -
backward + AdamW step          W, m, v (3 w_l)  W, m, v (3 w_l)
============================  ===============  ===============

so ``offload_bytes = steps * sum_offloaded 7 w_l`` = steps * (2 x the persistent state that does
not fit (W, m, v) + one more pass of its weights for the forward).  Every expert is moved every
step: with B x S tokens and top-k routing all experts are (virtually) always activated, and
AdamW updates an expert whose step gradient is zero anyway (its moments are not).

On CPU the bytes are counted (the simulated clock turns them into seconds with the
participant's host link).  On a CUDA model the same bytes really move through pinned host
buffers (:class:`PinnedOffloader`) once per step, timed; the model itself stays resident (the
engine's accelerator is large), so numerics are exactly those of fedavg.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

from flux.federation.update import Update
from flux.methods.api import RunContext, per_device_memory
from flux.methods.fedavg import FedAvg

# Per offloaded expert and step, in units of its weight bytes: W for the forward, W+m+v in and
# W+m+v out around the fused backward/AdamW step (see the module docstring).
DOWN_UNITS_PER_STEP = 4
UP_UNITS_PER_STEP = 3
# AdamW state per expert in units of its weight bytes: weights, gradient, exp_avg, exp_avg_sq.
STATE_UNITS = 4


@dataclasses.dataclass(frozen=True)
class OffloadPlan:
    """Which experts stay on the device and what moves per step.

    Attributes:
        memory_bytes: the participant's device memory.
        full_bytes: resident bytes of training every expert with nothing offloaded.
        fixed_bytes: the part of ``full_bytes`` that is not per-expert state.
        staging_bytes: the streaming slot (one expert's W, G, m, v); 0 when nothing is offloaded.
        expert_weight_bytes: per MoE layer, ``w_l`` (bytes of one expert's weights).
        resident: per layer, the experts whose full state stays on the device.
        offloaded: per layer, the experts whose W, m, v live in host memory.
    """

    memory_bytes: int
    full_bytes: int
    fixed_bytes: int
    staging_bytes: int
    expert_weight_bytes: tuple[int, ...]
    resident: tuple[tuple[int, ...], ...]
    offloaded: tuple[tuple[int, ...], ...]

    def _sum_offloaded(self, units: int) -> int:
        return sum(units * w * len(off) for w, off in zip(self.expert_weight_bytes, self.offloaded))

    @property
    def resident_bytes(self) -> int:
        """Device bytes while training: fixed + staging slot + the resident experts' state."""
        kept = sum(STATE_UNITS * w * len(res) for w, res in zip(self.expert_weight_bytes, self.resident))
        return self.fixed_bytes + self.staging_bytes + kept

    @property
    def host_bytes(self) -> int:
        """Host memory holding the offloaded experts' W, m, v."""
        return self._sum_offloaded(STATE_UNITS - 1)

    @property
    def num_offloaded(self) -> int:
        return sum(len(off) for off in self.offloaded)

    @property
    def bytes_down_per_step(self) -> int:
        return self._sum_offloaded(DOWN_UNITS_PER_STEP)

    @property
    def bytes_up_per_step(self) -> int:
        return self._sum_offloaded(UP_UNITS_PER_STEP)

    @property
    def bytes_per_step(self) -> int:
        """Host-link bytes of one local step, both directions."""
        return self.bytes_down_per_step + self.bytes_up_per_step


def plan_offload(handle, memory_bytes: int, dense: list[nn.Parameter]) -> OffloadPlan:
    """The FMD layout of a participant with ``memory_bytes`` of device memory.

    Args:
        handle: ``flux.patch`` handle of the model.
        dense: the non-expert parameters that train (their AdamW state is resident).

    Raises:
        ValueError: ``memory_bytes`` is negative, or below ``fixed + staging`` (the message
            names the minimum).
    """
    from flux.moe import estimate_memory

    if memory_bytes < 0:
        raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
    layers = handle.moe_layers
    full = estimate_memory(handle, None, optimizer="adamw", train_experts=True, trainable=dense)
    weight_bytes = []
    for layer, row in zip(layers, full.details["per_layer"]):
        w, rest = divmod(row["weights"], layer.num_experts)
        if rest:  # cannot happen for the estimate's e * per_expert * elem; guard the assumption
            raise ValueError(f"{layer.name}: expert weight bytes {row['weights']} not divisible by "
                             f"{layer.num_experts} experts")
        weight_bytes.append(w)
    per_expert_state = [STATE_UNITS * w for w in weight_bytes]
    fixed = full.total - sum(s * layer.num_experts for s, layer in zip(per_expert_state, layers))
    everything = [tuple(range(layer.num_experts)) for layer in layers]
    if full.total <= memory_bytes:
        return OffloadPlan(memory_bytes, full.total, fixed, 0, tuple(weight_bytes), tuple(everything),
                           tuple(() for _ in layers))
    staging = max(per_expert_state)
    room = memory_bytes - fixed - staging
    if room < 0:
        raise ValueError(f"memory_bytes={memory_bytes}: FMD needs at least {fixed + staging} bytes "
                         f"(non-expert state {fixed} + one expert's staging slot {staging})")
    resident: list[list[int]] = [[] for _ in layers]
    offloaded: list[list[int]] = [[] for _ in layers]
    full_so_far = False
    for l, layer in enumerate(layers):
        for e in range(layer.num_experts):
            if not full_so_far and per_expert_state[l] <= room:
                resident[l].append(e)
                room -= per_expert_state[l]
            else:
                full_so_far = True  # resident experts are a prefix of the (layer, expert) order
                offloaded[l].append(e)
    return OffloadPlan(memory_bytes, full.total, fixed, staging, tuple(weight_bytes),
                       tuple(tuple(r) for r in resident), tuple(tuple(o) for o in offloaded))


class PinnedOffloader:
    """Real host<->device traffic of one FMD step on CUDA (the schedule of the module docstring).

    Host side: per offloaded expert, pinned buffers for W, m and v (flattened ``gate_up`` and
    ``down``); device side: one staging slot.  :meth:`step` performs the step's copies and
    returns (bytes moved, seconds).  The model keeps its own weights; the W copied out is the
    expert's current value, so the host copy tracks training.
    """

    def __init__(self, handle, plan: OffloadPlan) -> None:
        self.handle = handle
        self.plan = plan
        self.host: dict[tuple[int, int], list[Tensor]] = {}
        slot = 0
        for l, experts in enumerate(plan.offloaded):
            layer = handle.moe_layers[l]
            for e in experts:
                w = self._flat_weights(layer, e)
                self.host[(l, e)] = [torch.empty_like(w, device="cpu").pin_memory() for _ in range(3)]
                slot = max(slot, w.numel())
        device = handle.moe_layers[0].source.device
        dtype = handle.moe_layers[0].source.dtype
        self.staging = [torch.empty(slot, dtype=dtype, device=device) for _ in range(3)]

    @staticmethod
    def _flat_weights(layer, expert: int) -> Tensor:
        w = layer.expert_weights(expert)
        return torch.cat([w.gate_up.reshape(-1), w.down.reshape(-1)])

    @torch.no_grad()
    def step(self) -> tuple[int, float]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        moved = 0
        for (l, e), (host_w, _, _) in self.host.items():  # forward: W in
            n = host_w.numel()
            self.staging[0][:n].copy_(host_w, non_blocking=True)
            moved += host_w.numel() * host_w.element_size()
        for (l, e), bufs in self.host.items():  # fused backward + AdamW: W, m, v in; W, m, v out
            n = bufs[0].numel()
            for slot, host in zip(self.staging, bufs):
                slot[:n].copy_(host, non_blocking=True)
            bufs[0].copy_(self._flat_weights(self.handle.moe_layers[l], e), non_blocking=True)
            bufs[1].copy_(self.staging[1][:n], non_blocking=True)
            bufs[2].copy_(self.staging[2][:n], non_blocking=True)
            moved += 6 * n * bufs[0].element_size()
        torch.cuda.synchronize()
        return moved, time.perf_counter() - start


class FMD(FedAvg):
    """fedavg's training (all experts, all participants) under the participant's memory limit,
    paying for it in host-link traffic (:func:`plan_offload`)."""

    name = "fmd"

    def __init__(self) -> None:
        self.plans: dict[int, OffloadPlan] = {}
        self._offloader: Optional[PinnedOffloader] = None
        self._measured: list[tuple[int, float]] = []

    def setup(self, ctx: RunContext) -> None:
        dense = list(self.dense_parameters(ctx).values())
        self.plans = per_device_memory(ctx, lambda memory: plan_offload(ctx.work.handle, memory, dense))

    def plan_for(self, ctx: RunContext, pid: int) -> OffloadPlan:
        if not self.plans:
            self.setup(ctx)
        return self.plans[pid]

    def train(self, ctx: RunContext, round_idx: int, pid: int, params, **kwargs):
        if self._offloader is None:
            return super().train(ctx, round_idx, pid, params, **kwargs)
        offloader = self._offloader

        def after_backward(micro_batch: dict, batch_size: int, index: int) -> None:
            self._measured.append(offloader.step())

        return super().train(ctx, round_idx, pid, params, on_micro_batch=after_backward, **kwargs)

    def local_update(self, ctx: RunContext, round_idx: int, pid: int, plan: Any, profile: Any) -> Update:
        offload = self.plan_for(ctx, pid)
        handle = ctx.work.handle
        on_cuda = torch.cuda.is_available() and handle.moe_layers[0].source.device.type == "cuda"
        self._offloader = PinnedOffloader(handle, offload) if on_cuda and offload.num_offloaded else None
        self._measured = []
        try:
            update = super().local_update(ctx, round_idx, pid, plan, profile)
        finally:
            self._offloader = None
        steps = len(self._measured) if self._measured else ctx.cfg.local_steps
        costs = update.costs
        if self._measured:
            moved = sum(b for b, _ in self._measured)
            transfer_s = sum(s for _, s in self._measured)
            # the clock models transfers from offload_bytes: keep them out of the measured compute
            costs.compute_s = max(0.0, costs.compute_s - transfer_s)
            costs.extra["offload_measured_s"] = transfer_s
        else:
            moved = steps * offload.bytes_per_step
        costs.offload_bytes = moved
        costs.peak_memory_bytes = min(offload.resident_bytes, offload.full_bytes)
        costs.extra["num_offloaded"] = offload.num_offloaded
        costs.extra["host_bytes"] = offload.host_bytes
        return update
