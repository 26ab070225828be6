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

from typing import Any, Sequence

import torch
from torch import Tensor

from flux.federation.update import Update
from flux.methods.api import Method, RunContext


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


class FMES(Method):
    """Train only the most-activated experts that fit; drop the others (module docstring)."""

    name = "fmes"
    needs_profiles = True

    def __init__(self) -> None:
        self.last_kept: dict[int, list[list[int]]] = {}

    def setup(self, ctx: RunContext) -> None:
        dense = list(self.dense_parameters(ctx).values())
        handle = ctx.work.handle
        floor = kept_bytes(handle, [1] * len(handle.moe_layers), dense)
        short = [pid for pid, dev in enumerate(ctx.devices) if dev.memory_bytes < floor]
        if short:
            raise ValueError(f"participants {short}: memory below FMES's minimum of {floor} bytes "
                             "(one trained expert per layer)")

    def trained_experts(self, ctx: RunContext, round_idx: int, pid: int, plan: Any, profile: Any) -> set:
        """The kept experts: the server knows the profile and the memory, so it knows them too."""
        keep = select_experts(ctx.work.handle, profile.frequencies(), int(ctx.devices[pid].memory_bytes),
                              list(self.dense_parameters(ctx).values()))
        return {(l, e) for l, kept in enumerate(keep) for e in kept}

    def local_update(self, ctx: RunContext, round_idx: int, pid: int, plan: Any, profile: Any) -> Update:
        from flux.merging.install import drop_model

        handle = ctx.work.handle
        memory = int(ctx.devices[pid].memory_bytes)
        with self.session(ctx, round_idx, pid) as s:
            dense = list(s.dense.values())
            with s.overhead():
                keep = select_experts(handle, profile.frequencies(), memory, dense)
                self.last_kept[pid] = keep
                drop_model(handle, keep, trainable=True)
                s.begin()
            stats = s.train()
            with s.overhead():
                deltas, tokens = s.view_deltas(routed_only=True)
                dense_deltas = s.dense_deltas()
            return s.upload(stats, deltas, tokens, dense_deltas=dense_deltas, profile=profile,
                            peak_memory_bytes=kept_bytes(handle, [len(k) for k in keep], dense),
                            num_kept=sum(len(k) for k in keep))
