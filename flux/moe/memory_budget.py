"""A participant's tuning-expert and merged-group budgets from its memory limit.

The paper fixes B_tune(i) and B_non(i) from each participant's memory but does not say how.
Here the numbers come from the drop-in layer's own accounting (:func:`flux.moe.estimate_memory`),
so a budget is exactly what the installed view plus an optimizer step will hold.

Policy (:func:`budgets_from_memory`; every knob is an argument):

* **Fixed bytes**: everything that does not depend on the budgets: non-expert weights, the
  training state (grads + optimizer) of the non-expert parameters named by ``trainable``, FLUX's
  per-layer routing counts and group index, and ``activation_bytes`` (activations are not
  resident state, so the caller states them).
* **Floor**: every MoE layer keeps ``min_merged_per_layer`` merged groups (default 1, which
  Eq. 1 also requires: a layer without any group would drop its non-tuning experts, FMES-style).
* **Tuning first**: B_tune = the largest t <= ``max_tune_fraction`` * E_total such that fixed +
  t tuning experts (weights + grads + optimizer state) + the floor groups fit.  Tuning experts
  are what the participant contributes to the global model, so they get memory first; the cap
  (default a quarter of the experts) keeps memory for merged groups, whose count bounds the
  merge error of the frozen part.
* **Group share** (``min_group_share`` = s > 0): B_tune is instead the largest t whose layout
  also holds ceil(s * (E_total - t)) merged groups (or the floor, if that is more), and at least
  one tuning expert either way.  A tuning expert (weights, grads, optimizer state) costs several
  merged groups, so a small device that tunes first is left with about one group per layer, and
  the view it trains in is then far from the global model (``flux evaluate --views`` measures
  it).  s = 0 is tuning first.
* **Merged groups fill the rest**: B_non = the floor plus as many extra frozen groups (int4/int8
  with ``frozen_bits``) as fit, capped at E_total - t (a group per non-tuning expert is no
  merging at all).

Because tuning goes first, B_non can fall when more memory buys one more tuning expert (one
fp32 AdamW tuning expert costs about as much as four fp32 merged groups); B_tune never falls.

The bytes are evaluated on a *canonical layout*: units are dealt round-robin over the layers
(largest experts first), tuning experts before extra groups, each layer holding at most E_l
units.  Spreading tuning experts over as many layers as possible is the worst case of the
optimizer's per-parameter step scalars, so for layers of equal size any placement the role
assignment and Eq. 1 later pick needs at most the reported bytes.  The originals are assumed
released (``keep_originals=False``): the participant holds only the merged view.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from flux.moe.handle import PatchHandle
from flux.moe.memory import LayerLayout, MemoryReport, estimate_memory
from flux.moe.merged_view import FROZEN_QUANTIZATIONS

Trainable = Union[str, Iterable[nn.Parameter]]


@dataclass
class MemoryBudget:
    """Budgets of one participant and the bytes behind them.

    Attributes:
        tune: B_tune, tuning experts over all layers.
        merged: B_non, merged (frozen) groups over all layers (the Eq. 1 total).
        memory_bytes: the limit the budgets were derived for.
        used_bytes: estimate of the chosen canonical layout plus activation bytes (<= limit).
        per_tuning_expert_bytes: bytes the first tuning expert adds (weights + grads +
            optimizer state, including the optimizer's per-parameter step scalars).
        per_merged_group_bytes: bytes one frozen group adds (quantized with frozen_bits).
        fixed_bytes: bytes of the layout with no tuning expert and no group (non-expert
            weights and their training state, FLUX's per-layer index tensors) + activations.
        report: :func:`estimate_memory` of the chosen layout.
        layouts: the chosen canonical layout, one :class:`LayerLayout` per MoE layer.
    """

    tune: int
    merged: int
    memory_bytes: int
    used_bytes: int
    per_tuning_expert_bytes: int
    per_merged_group_bytes: int
    fixed_bytes: int
    report: Optional[MemoryReport]
    layouts: list[LayerLayout] = field(default_factory=list)


def _nonnegative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _materialize(trainable: Trainable) -> Trainable:
    # a generator would be used up by the first of many estimate_memory calls
    return trainable if isinstance(trainable, str) else list(trainable)


def weights_bytes(handle: PatchHandle, *, dtype: Optional[torch.dtype] = None) -> int:
    """Resident bytes of the patched model's weights with the full expert set (no view, nothing
    trained), including FLUX's per-layer counts buffers."""
    return estimate_memory(handle, None, dtype=dtype, train_experts=False, trainable="none").weights


def full_training_bytes(
    handle: PatchHandle,
    *,
    optimizer: Union[str, Mapping] = "adamw",
    trainable: Trainable = "none",
    dtype: Optional[torch.dtype] = None,
) -> int:
    """Bytes to train every expert (weights + grads + optimizer state, no view, no merging):
    the footprint that FLUX's participants cannot afford."""
    return estimate_memory(handle, None, dtype=dtype, optimizer=optimizer, train_experts=True,
                           trainable=_materialize(trainable)).total


def fit_check(
    handle: PatchHandle,
    memory_bytes: int,
    layout: Union[None, LayerLayout, Sequence[Optional[LayerLayout]], Mapping[int, Optional[LayerLayout]]],
    *,
    optimizer: Union[str, Mapping] = "adamw",
    trainable: Trainable = "none",
    activation_bytes: int = 0,
    dtype: Optional[torch.dtype] = None,
    train_experts: bool = True,
) -> bool:
    """True when ``layout`` (as :func:`estimate_memory` takes it) plus ``activation_bytes`` fits
    in ``memory_bytes``."""
    memory_bytes = _nonnegative_int(memory_bytes, "memory_bytes")
    activation_bytes = _nonnegative_int(activation_bytes, "activation_bytes")
    report = estimate_memory(handle, layout, dtype=dtype, optimizer=optimizer, train_experts=train_experts,
                             trainable=_materialize(trainable))
    return report.total + activation_bytes <= memory_bytes


def _deal(units: int, capacity: Sequence[int], order: Sequence[int]) -> list[int]:
    """Deal ``units`` one at a time round-robin over ``order``, skipping full layers."""
    out = [0] * len(capacity)
    left = units
    while left:
        dealt = False
        for l in order:
            if left and out[l] < capacity[l]:
                out[l] += 1
                left -= 1
                dealt = True
        if not dealt:
            raise AssertionError(f"unreachable: {units} units exceed the capacity {list(capacity)}")
    return out


class _Canonical:
    """Canonical layouts for (t tuning experts, m extra groups) and their estimated bytes."""

    def __init__(self, handle: PatchHandle, *, min_merged: int, frozen_bits: Optional[int | str], group_size: int,
                 keep_originals: bool, dtype, optimizer, trainable, activation_bytes: int) -> None:
        self.handle = handle
        self.experts = [layer.num_experts for layer in handle.moe_layers]
        self.min_merged = min_merged
        self.free = [e - min_merged for e in self.experts]  # units per layer beyond the floor
        size = [layer.hidden_size * layer.intermediate_size for layer in handle.moe_layers]
        self.order = sorted(range(len(size)), key=lambda l: (-size[l], l))  # largest experts first
        self.frozen_bits, self.group_size, self.keep_originals = frozen_bits, group_size, keep_originals
        self.kwargs = dict(dtype=dtype, optimizer=optimizer, trainable=trainable)
        self.activation_bytes = activation_bytes

    def tuned(self, t: int) -> list[int]:
        return _deal(t, self.free, self.order)

    def layouts(self, t: int, extra: int, *, floor: bool = True) -> list[LayerLayout]:
        tuned = self.tuned(t)
        room = [f - n for f, n in zip(self.free, tuned)]
        groups = _deal(extra, room, self.order)
        base = self.min_merged if floor else 0
        return [LayerLayout(tuned=n, merged_groups=base + g, quantize_bits=self.frozen_bits,
                            quantize_group_size=self.group_size, keep_originals=self.keep_originals)
                for n, g in zip(tuned, groups)]

    def report(self, t: int, extra: int, *, floor: bool = True) -> MemoryReport:
        return estimate_memory(self.handle, self.layouts(t, extra, floor=floor), train_experts=True, **self.kwargs)

    def cost(self, t: int, extra: int, *, floor: bool = True) -> int:
        return self.report(t, extra, floor=floor).total + self.activation_bytes


def _largest_fitting(lo: int, hi: int, fits) -> int:
    """Largest x in [lo, hi] with fits(x), given fits(lo) and fits monotone (true then false)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def budgets_from_memory(
    handle: PatchHandle,
    memory_bytes: int,
    *,
    optimizer: Union[str, Mapping] = "adamw",
    frozen_bits: Optional[int | str] = None,
    activation_bytes: int = 0,
    trainable: Trainable = "none",
    max_tune_fraction: float = 0.25,
    min_merged_per_layer: int = 1,
    min_group_share: float = 0.0,
    quantize_group_size: int = 64,
    keep_originals: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> MemoryBudget:
    """B_tune and B_non of a participant with ``memory_bytes`` of accelerator memory (policy in
    the module docstring).

    Args:
        handle: the patched model (its current view, if any, is ignored).
        memory_bytes: the participant's memory limit in bytes (>= 0).
        optimizer: as :func:`estimate_memory` ('adamw', 'adam', 'sgd', 'sgd_momentum', dict).
        frozen_bits: None, 4, 8 or 'nf4': storage of the merged groups (LayerLayout.quantize_bits).
        activation_bytes: bytes reserved for activations and other transient memory.
        trainable: non-expert parameters that are trained too ('none', 'all' or parameters).
        max_tune_fraction: cap on B_tune as a share of all experts, in (0, 1]; at least 1.
        min_merged_per_layer: merged groups every layer keeps (>= 0).
        min_group_share: in [0, 1]: merged groups for at least this share of the non-tuning
            experts before B_tune takes the rest of the memory (0: tuning first).
        quantize_group_size, keep_originals, dtype: as :class:`LayerLayout` / estimate_memory.

    Raises:
        ValueError: a bad argument, or a memory limit below the minimum (one tuning expert and
            the floor groups), with the bytes that minimum needs.
    """
    memory_bytes = _nonnegative_int(memory_bytes, "memory_bytes")
    activation_bytes = _nonnegative_int(activation_bytes, "activation_bytes")
    min_merged = _nonnegative_int(min_merged_per_layer, "min_merged_per_layer")
    if frozen_bits not in FROZEN_QUANTIZATIONS:
        raise ValueError(f"frozen_bits must be None, 4, 8 or 'nf4', got {frozen_bits!r}")
    if not isinstance(max_tune_fraction, numbers.Real) or not 0 < max_tune_fraction <= 1:
        raise ValueError(f"max_tune_fraction must lie in (0, 1], got {max_tune_fraction!r}")
    if isinstance(min_group_share, bool) or not isinstance(min_group_share, numbers.Real) \
            or not 0 <= min_group_share <= 1:
        raise ValueError(f"min_group_share must lie in [0, 1], got {min_group_share!r}")
    layers = handle.moe_layers
    if not layers:
        raise ValueError("the model has no MoE layers: there are no expert budgets to derive")
    small = [layer.name for layer in layers if layer.num_experts <= min_merged]
    if small:
        raise ValueError(f"min_merged_per_layer={min_merged} leaves no room for a tuning expert in {small}")

    canon = _Canonical(handle, min_merged=min_merged, frozen_bits=frozen_bits, group_size=quantize_group_size,
                       keep_originals=keep_originals, dtype=dtype, optimizer=optimizer,
                       trainable=_materialize(trainable), activation_bytes=activation_bytes)
    total_experts = sum(canon.experts)
    floor_groups = min_merged * len(layers)
    tune_cap = min(max(1, math.floor(max_tune_fraction * total_experts + 1e-9)), sum(canon.free))

    needed = canon.cost(1, 0)
    if needed > memory_bytes:
        raise ValueError(
            f"memory_bytes={memory_bytes} is too small: one tuning expert plus {min_merged} merged group(s) in each "
            f"of the {len(layers)} MoE layers need at least {needed} bytes"
            + (f" (including activation_bytes={activation_bytes})" if activation_bytes else "")
        )

    def share_groups(t: int) -> int:  # extra groups (above the floor) the share asks for next to t
        wanted = math.ceil(min_group_share * (total_experts - t) - 1e-9)
        return max(0, min(total_experts - t, wanted) - floor_groups)

    def fits(t: int) -> bool:
        return canon.cost(t, share_groups(t)) <= memory_bytes

    # one more tuning expert costs more than the groups the share then no longer asks for, so
    # fits is monotone; where even one tuning expert and its share do not fit, one it is
    tune = _largest_fitting(1, tune_cap, fits) if fits(1) else 1
    extra_cap = total_experts - tune - floor_groups
    extra = _largest_fitting(0, extra_cap, lambda m: canon.cost(tune, m) <= memory_bytes)

    report = canon.report(tune, extra)
    fixed = canon.cost(0, 0, floor=False)
    return MemoryBudget(
        tune=tune,
        merged=floor_groups + extra,
        memory_bytes=memory_bytes,
        used_bytes=report.total + activation_bytes,
        per_tuning_expert_bytes=canon.cost(1, 0, floor=False) - fixed,
        per_merged_group_bytes=canon.cost(0, 1, floor=False) - fixed,
        fixed_bytes=fixed,
        report=report,
        layouts=canon.layouts(tune, extra),
    )
