"""FMES: each participant keeps and trains only its most-activated experts; the rest are dropped.

Per round and participant (FedMoE-style expert selection):

1. rank every (layer, expert) by the participant's profiled activation frequency (the share of
   the layer's tokens routed to it; ties: shallower layer, then lower expert id);
2. keep the top expert of every layer (a layer needs at least one), then walk down the ranking
   adding every expert that still fits: the layout's resident bytes, by
   :func:`flux.moe.estimate_memory` with ``LayerLayout(tuned=k_l, keep_originals=False)`` (kept
   experts in full precision with gradients and AdamW state, dropped experts not held at all,
   plus non-expert weights and their training state), must stay within the device memory;
3. install the layout (:func:`flux.merging.install.drop_model`: kept experts are trainable
   groups, every other expert maps to -1 and contributes nothing, the router is unchanged);
4. train the kept experts (and the dense trainables), upload the deltas of the kept experts
   that received tokens, remove the view without write-back.

The simulation keeps the global model's experts in place while the view is installed (so
nothing needs restoring); the accounting describes the participant's device, which holds only
the kept experts.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import Tensor

from flux.federation.aggregate import Update
from flux.federation.local import snapshot, take_deltas
from flux.federation.methods import Method, RunContext, expert_tokens, make_update, view_expert_deltas
from flux.federation.workload import set_requires_grad


def _layouts(counts: Sequence[int]):
    from flux.moe import LayerLayout

    return [LayerLayout(tuned=k, merged_groups=0, keep_originals=False) for k in counts]


def kept_bytes(handle, counts: Sequence[int], dense: list) -> int:
    """Resident bytes of a drop layout keeping ``counts[l]`` experts of layer l (trained with
    AdamW) and training ``dense``."""
    from flux.moe import estimate_memory

    return estimate_memory(handle, _layouts(counts), optimizer="adamw", train_experts=False,
                           trainable=dense).total


def select_experts(handle, frequencies: Sequence[Tensor], memory_bytes: int, dense: list) -> list[list[int]]:
    """The experts an FMES participant keeps (module docstring, steps 1-2).

    Args:
        frequencies: per MoE layer, activation frequencies float [E_l] (``profile.frequencies()``).
        memory_bytes: the participant's device memory.
        dense: the non-expert parameters that train.

    Returns:
        per layer the kept expert ids, ascending.

    Raises:
        ValueError: ``frequencies`` does not match the model, or not even one expert per layer fits.
    """
    layers = handle.moe_layers
    if len(frequencies) != len(layers):
        raise ValueError(f"frequencies has {len(frequencies)} layers, the model has {len(layers)} MoE layers")
    freqs = [torch.as_tensor(f, dtype=torch.float64).flatten() for f in frequencies]
    for l, (f, layer) in enumerate(zip(freqs, layers)):
        if f.numel() != layer.num_experts:
            raise ValueError(f"frequencies[{l}] has {f.numel()} entries, layer {l} has {layer.num_experts} experts")
    # stable sort on -f keeps lower ids first among ties
    ranked = [torch.sort(-f, stable=True).indices.tolist() for f in freqs]
    kept = [[r[0]] for r in ranked]
    counts = [1] * len(layers)
    used = kept_bytes(handle, counts, dense)
    if used > memory_bytes:
        raise ValueError(f"memory_bytes={memory_bytes}: FMES needs at least {used} bytes (one trained "
                         f"expert per layer, {len(layers)} layers)")
    candidates = sorted(((-float(freqs[l][e]), l, e) for l, r in enumerate(ranked) for e in r[1:]))
    for _, l, e in candidates:
        counts[l] += 1
        need = kept_bytes(handle, counts, dense)
        if need <= memory_bytes:
            kept[l].append(e)
            used = need
        else:
            counts[l] -= 1
    return [sorted(k) for k in kept]


class FMESMethod(Method):
    """Train only the most-activated experts that fit; drop the others (module docstring)."""

    name = "fmes"
    needs_profiles = True

    def __init__(self) -> None:
        self.last_kept: dict[int, list[list[int]]] = {}

    def setup(self, ctx: RunContext) -> None:
        dense = list(self._dense(ctx).values())
        handle = ctx.work.handle
        floor = kept_bytes(handle, [1] * len(handle.moe_layers), dense)
        short = [pid for pid, dev in enumerate(ctx.devices) if dev.memory_bytes < floor]
        if short:
            raise ValueError(f"participants {short}: memory below FMES's minimum of {floor} bytes "
                             "(one trained expert per layer)")

    def local_update(self, ctx: RunContext, round_idx: int, pid: int, plan: Any, profile: Any) -> Update:
        from flux.merging.install import drop_model, uninstall

        work = ctx.work
        handle, model = work.handle, work.model
        layers = handle.moe_layers
        memory = int(ctx.devices[pid].memory_bytes)
        t0 = time.perf_counter()
        dense = self._dense(ctx)
        keep = select_experts(handle, profile.frequencies(), memory, list(dense.values()))
        self.last_kept[pid] = keep
        drop_model(handle, keep, trainable=True)
        try:
            view_params = {f"__view{l}.{i}": p for l, layer in enumerate(layers)
                           for i, p in enumerate(layer.trainable_parameters())}
            trainable = {**dense, **view_params}
            set_requires_grad(model, trainable)
            before_dense = snapshot(dense)
            handle.reset_counts()
            overhead_s = time.perf_counter() - t0
            stats = self._train(ctx, round_idx, pid, list(trainable.values()))
            t1 = time.perf_counter()
            deltas, tokens = view_expert_deltas(handle, expert_tokens(handle), routed_only=True)
            dense_deltas = take_deltas(dense, before_dense)
            overhead_s += time.perf_counter() - t1
        finally:
            uninstall(handle, write_back=False)
            set_requires_grad(model, None)
        peak = kept_bytes(handle, [len(k) for k in keep], list(dense.values()))
        return make_update(pid, stats, model, deltas, tokens, dense_deltas, peak_memory_bytes=peak,
                           profile_s=float(getattr(profile, "seconds", 0.0)), overhead_s=overhead_s,
                           num_kept=sum(len(k) for k in keep))
