"""Install merge plans on a patched model: the glue between :mod:`flux.merging` and the
drop-in layer's merged views (:meth:`flux.moe.MoELayerHandle.install_view`).

    stacks = layer_weight_stacks(handle)                 # per layer {"gate_up", "down"}, originals
    plans = merge_model(handle, tuning, freqs, attn, total_budget=12, quantize_bits=4)
    ...train handle.trainable_parameters()...
    upload = collect_tuned(handle)                       # {(layer, expert): ExpertWeights}
    uninstall(handle)                                    # tuning experts written back

Layout of every layer (the ``merged_moe`` contract, see :class:`flux.merging.LayerMergePlan`):
tuning experts are their own trainable groups (0..T-1, ascending expert id), each merged
cluster is one frozen group (optionally int4/int8), -1 drops an expert.  :func:`drop_model`
builds the FMES layout (kept experts only) and :func:`uniform_budgets` / :func:`single_budgets`
the per-layer budgets of the merging ablation's baselines.

Installation is all-or-nothing: every layer's view is built first with the originals kept; if
one layer fails the views installed so far are removed, and only when all succeeded are the
originals released (``keep_originals=False``).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from flux.merging.layer_budgets import DEFAULT_VAR_FLOOR
from flux.merging.kmeans import DEFAULT_ITERS, DEFAULT_PCA_DIM
from flux.merging.merge import LayerMergePlan, assemble_group_weights, plan_model_merge
from flux.moe.handle import MoELayerHandle, PatchHandle
from flux.moe.merged_view import ExpertWeights

#: Keys of :func:`layer_weight_stacks` (biases only for experts that have them); the same keys
#: ``MoELayerHandle.remove_view(full_weights=...)`` and ``install_view`` use.
STACK_KEYS = ("gate_up", "down", "gate_up_bias", "down_bias")


# --------------------------------------------------------------------------------- weights
def layer_weight_stacks(handle: PatchHandle) -> list[dict[str, Tensor]]:
    """Detached stacks of every MoE layer's ORIGINAL experts (shallowest layer first).

    Returns:
        per layer ``{"gate_up": [E, 2I, H], "down": [E, H, I]}`` plus ``"gate_up_bias"`` [E, 2I]
        and ``"down_bias"`` [E, H] for experts with biases; the model's dtype and device.  For
        fused transformers experts in the plain layout these share storage with the model's
        Parameters (no copy); transposed/interleaved or ModuleList layers give a copy.  Under an
        installed view they still hold the originals (not the tuning experts' current weights).

    Raises:
        RuntimeError: a layer's originals were released (``keep_originals=False``).
    """
    out = []
    with torch.no_grad():
        for layer in handle.moe_layers:
            if layer.source.released:
                raise RuntimeError(
                    f"{layer.name}: the original expert weights were released by a view with "
                    "keep_originals=False; uninstall(handle, full_weights=...) first"
                )
            gate_up, down, gate_up_bias, down_bias = layer.source.full_stacks()
            stacks = {"gate_up": gate_up.detach(), "down": down.detach()}
            if gate_up_bias is not None:
                stacks["gate_up_bias"] = gate_up_bias.detach()
                stacks["down_bias"] = down_bias.detach()
            out.append(stacks)
    return out


# --------------------------------------------------------------------------------- install
def _install_all(handle: PatchHandle, layouts: Sequence[dict], quantize_bits: Optional[int | str],
                 keep_originals: bool) -> None:
    """``install_view(**layouts[l])`` on every layer, all-or-nothing; release originals last."""
    layers = handle.moe_layers
    busy = [layer.name for layer in layers if layer.view is not None]
    if busy:
        raise RuntimeError(f"merged views are already installed on {busy}; uninstall(handle) first")
    installed: list[MoELayerHandle] = []
    try:
        for layer, layout in zip(layers, layouts):
            layer.install_view(**layout, quantize_bits=quantize_bits, keep_originals=True)
            installed.append(layer)
    except BaseException:
        for layer in installed:
            layer.remove_view(write_back=False)
        raise
    if not keep_originals:
        for layer in layers:
            layer.source.release()


def _check_plans(handle: PatchHandle, plans: Sequence[LayerMergePlan]) -> None:
    layers = handle.moe_layers
    if len(plans) != len(layers):
        raise ValueError(f"plans has {len(plans)} entries but the model has {len(layers)} MoE layers")
    for layer, plan in zip(layers, plans):
        if not isinstance(plan, LayerMergePlan):
            raise ValueError(f"{layer.name}: expected a LayerMergePlan, got {type(plan).__name__}")
        if plan.expert_to_group.numel() != layer.num_experts:
            raise ValueError(f"{layer.name}: plan maps {plan.expert_to_group.numel()} experts, "
                             f"the layer has {layer.num_experts}")


def install_merge(
    handle: PatchHandle,
    plans: Sequence[LayerMergePlan],
    *,
    quantize_bits: Optional[int | str] = None,
    keep_originals: bool = True,
    frozen_tuning: Optional[Sequence[Sequence[int]]] = None,
    stacks: Optional[Sequence[Mapping[str, Tensor]]] = None,
) -> None:
    """Serve every MoE layer by the groups of its plan.

    Tuning experts become trainable groups initialised from the original experts; merged
    clusters become frozen groups holding ``plan.merged_weights`` (keys ``gate_up``/``down``
    [G - T, ...], plus bias keys for biased experts, as :func:`layer_weight_stacks` names them);
    ``-1`` experts are dropped.

    Args:
        handle: from :func:`flux.patch`, with no view installed.
        plans: one :class:`LayerMergePlan` per MoE layer (shallowest first), e.g. from
            :func:`flux.merging.plan_model_merge` on :func:`layer_weight_stacks`.
        quantize_bits: None (full precision), 4, 8 or "nf4" (bitsandbytes) for the frozen groups.
        keep_originals: False frees the original experts once every view is in place
            (:func:`uninstall` then needs ``full_weights``).
        frozen_tuning: per layer, tuning experts whose (own, unmerged) group is installed frozen
            instead of trainable: FLUX's exploration experts under forward-only (zeroth-order)
            updates, which must not cost a weight-gradient in the backward pass.
        stacks: the expert weights the groups are built from, as :func:`layer_weight_stacks`
            (default: the originals), e.g. a participant's copies with quantized read-only experts.
    """
    _check_plans(handle, plans)
    if frozen_tuning is not None and len(frozen_tuning) != len(plans):
        raise ValueError(f"frozen_tuning has {len(frozen_tuning)} entries but there are {len(plans)} plans")
    stacks = layer_weight_stacks(handle) if stacks is None else stacks
    layouts = []
    with torch.no_grad():
        for layer, plan, weights in zip(handle.moe_layers, plans, stacks):
            missing = [k for k in weights if k not in plan.merged_weights]
            if missing:
                raise ValueError(f"{layer.name}: plan.merged_weights lacks {missing} "
                                 f"(has {sorted(plan.merged_weights)})")
            groups = assemble_group_weights(plan, weights)
            frozen = set(int(e) for e in frozen_tuning[len(layouts)]) if frozen_tuning is not None else set()
            trainable = ([int(e) not in frozen for e in plan.tuning_experts.tolist()]
                         + [False] * (plan.num_groups - plan.num_tuning))
            layouts.append(dict(expert_to_group=plan.expert_to_group, trainable=trainable, **groups))
    del stacks  # drop the references to the originals before they may be released
    _install_all(handle, layouts, quantize_bits, keep_originals)


def merge_model(
    handle: PatchHandle,
    tuning_per_layer: Sequence[Sequence[int] | Tensor],
    freqs_per_layer: Sequence[Tensor | Sequence[float]],
    attn_per_layer: Sequence[Tensor | Sequence[float]] | None,
    total_budget: int | None = None,
    *,
    budgets: Sequence[int] | None = None,
    mode: str = "freq_attn",
    quantize_bits: Optional[int | str] = None,
    keep_originals: bool = True,
    seed: int = 0,
    fused: bool = True,
    pca_dim: int = DEFAULT_PCA_DIM,
    iters: int = DEFAULT_ITERS,
    var_floor: float = DEFAULT_VAR_FLOOR,
    frozen_tuning: Optional[Sequence[Sequence[int]]] = None,
    stacks: Optional[Sequence[Mapping[str, Tensor]]] = None,
    clustering: str = "kmeans",
) -> list[LayerMergePlan]:
    """FLUX technique 2 on a patched model: :func:`flux.merging.plan_model_merge` on the
    original experts (Eq. 1 budgets unless ``budgets`` is given, fused K-Means, Eq. 2), then
    :func:`install_merge`.

    Args:
        tuning_per_layer: per MoE layer, the tuning expert ids.
        freqs_per_layer: per layer, activation frequencies float [E_l].
        attn_per_layer: per layer, mean attention scores float [E_l] (None unless "freq_attn").
        total_budget / budgets / mode / seed / fused / pca_dim / iters / var_floor / clustering: as
            :func:`flux.merging.plan_model_merge`.
        quantize_bits / keep_originals / frozen_tuning / stacks: as :func:`install_merge`; the
            plan (clustering, Eq. 2) is computed on ``stacks`` too.

    Returns:
        The installed plans, one per layer.
    """
    if stacks is None:
        stacks = layer_weight_stacks(handle)
    plans = plan_model_merge(
        stacks, tuning_per_layer, freqs_per_layer, attn_per_layer, total_budget,
        budgets=budgets, mode=mode, pca_dim=pca_dim, iters=iters, seed=seed, fused=fused, var_floor=var_floor,
        clustering=clustering,
    )
    install_merge(handle, plans, quantize_bits=quantize_bits, keep_originals=keep_originals,
                  frozen_tuning=frozen_tuning, stacks=stacks)
    return plans


def drop_model(
    handle: PatchHandle,
    keep_per_layer: Sequence[Sequence[int]],
    *,
    trainable: bool = True,
    quantize_bits: Optional[int | str] = None,
    keep_originals: bool = True,
) -> None:
    """FMES-style layout: each kept expert is its own group (trainable, or frozen with
    ``trainable=False``), every other expert is dropped (its routing weight contributes
    nothing; the router still scores it, as in expert pruning without re-routing).

    Args:
        keep_per_layer: per MoE layer, the kept expert ids (distinct, at least one).
        quantize_bits: only for ``trainable=False`` (frozen kept experts).
    """
    layers = handle.moe_layers
    if len(keep_per_layer) != len(layers):
        raise ValueError(f"keep_per_layer has {len(keep_per_layer)} entries but the model has "
                         f"{len(layers)} MoE layers")
    layouts = []
    for layer, keep in zip(layers, keep_per_layer):
        keep = sorted(int(e) for e in (keep.tolist() if isinstance(keep, Tensor) else keep))
        if not keep:
            raise ValueError(f"{layer.name}: keep_per_layer is empty; a layer needs at least one kept expert")
        kept = set(keep)
        drop = [e for e in range(layer.num_experts) if e not in kept]
        if trainable:
            layouts.append(layer.merged_groups(keep, (), drop=drop))
        else:  # one single-member (so unaveraged) frozen cluster per kept expert
            layouts.append(layer.merged_groups((), [[e] for e in keep], drop=drop))
    _install_all(handle, layouts, quantize_bits, keep_originals)


# --------------------------------------------------------------------------------- ablation budgets
def _check_counts(nontuning_per_layer: Sequence[int]) -> list[int]:
    counts = [int(n) for n in nontuning_per_layer]
    if any(n < 0 or n != m for n, m in zip(counts, nontuning_per_layer)):
        raise ValueError(f"nontuning_per_layer must hold ints >= 0, got {list(nontuning_per_layer)}")
    return counts


def uniform_budgets(nontuning_per_layer: Sequence[int], total: int) -> list[int]:
    """Equal split of ``total`` merged groups over the layers that have non-tuning experts (the
    "uniform per-layer budget" baseline of the merging ablation).

    Groups are dealt one at a time, shallowest layer first, skipping full layers: every such
    layer gets ``total // L'`` or one more (the remainder goes to shallow layers), within
    ``[1, n_l]``; what a full layer cannot take goes to the others.  Layers with ``n_l == 0``
    get 0.

    Raises:
        ValueError: ``total`` below the number of layers with non-tuning experts or above their
            sum.
    """
    counts = _check_counts(nontuning_per_layer)
    active = [l for l, n in enumerate(counts) if n > 0]
    if isinstance(total, bool) or int(total) != total:
        raise ValueError(f"total must be an int, got {total!r}")
    total = int(total)
    if not len(active) <= total <= sum(counts):
        raise ValueError(f"total={total} must lie in [{len(active)}, {sum(counts)}]: at least one group per layer "
                         f"with non-tuning experts and at most one per expert (counts {counts})")
    out = [0] * len(counts)
    left = total
    while left:
        for l in active:
            if left and out[l] < counts[l]:
                out[l] += 1
                left -= 1
    return out


def single_budgets(nontuning_per_layer: Sequence[int]) -> list[int]:
    """One merged group per layer that has non-tuning experts (0 elsewhere): the "one merged
    expert per layer" baseline of the merging ablation."""
    return [1 if n > 0 else 0 for n in _check_counts(nontuning_per_layer)]


# --------------------------------------------------------------------------------- read back
def collect_tuned(handle: PatchHandle, *, copy: bool = True) -> dict[tuple[int, int], ExpertWeights]:
    """``{(layer index, expert id): weights}`` of every tuning expert (trainable group) under the
    installed views: the update a participant uploads.  ``copy=True`` returns snapshots that
    later training does not change; ``copy=False`` detached tensors sharing the view's storage."""
    out = {}
    for l, layer in enumerate(handle.moe_layers):
        for e, w in layer.tuned_weights().items():
            if copy:
                w = ExpertWeights(*(None if t is None else t.clone() for t in
                                    (w.gate_up, w.down, w.gate_up_bias, w.down_bias)))
            out[(l, e)] = w
    return out


def uninstall(
    handle: PatchHandle,
    *,
    write_back: bool = True,
    full_weights: Optional[Sequence[Optional[Mapping[str, Tensor]]]] = None,
) -> None:
    """Remove every layer's view; the trained tuning experts are written into the original
    parameters (``write_back=True``), all other experts keep their original values.

    Args:
        full_weights: needed where the originals were released: per layer ``{"gate_up": [E, 2I,
            H], "down": [E, H, I]}`` (+ bias keys), e.g. the global model's experts (the output of
            :func:`layer_weight_stacks` taken before install, cloned); None entries for layers
            that kept their originals.
    """
    layers = handle.moe_layers
    if full_weights is not None and len(full_weights) != len(layers):
        raise ValueError(f"full_weights has {len(full_weights)} entries but the model has {len(layers)} MoE layers")
    fulls = [None] * len(layers) if full_weights is None else list(full_weights)
    for l, (layer, full) in enumerate(zip(layers, fulls)):  # check all before removing any
        if layer.view is not None and layer.source.released and full is None:
            raise ValueError(f"{layer.name}: the originals were released; pass full_weights[{l}] = "
                             "{'gate_up': [E, 2I, H], 'down': [E, H, I]}")
    for layer, full in zip(layers, fulls):
        layer.remove_view(write_back=write_back, full_weights=None if full is None else dict(full))
