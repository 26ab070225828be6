"""Merging non-tuning experts (FLUX Eq. 2) and the per-layer merge plan.

    W_c = sum_{e in c} alpha_e / (sum_{e' in c} alpha_e') * W_e,   alpha_e = f_e * attn_e

applied to every weight tensor of the expert.  ``f_e`` is the expert's activation frequency and
``attn_e`` the mean attention score of the tokens routed to it, both from the (quantized) profile.
Only ratios inside a cluster matter, so any non-negative attention score works; the profiler is
expected to give the mean, over the tokens routed to e, of the attention those tokens receive
(mean over heads and query positions), see docs/techniques.md.  Modes: "freq_attn" (Eq. 2),
"freq" (alpha = f, the paper's ablation) and "avg" (plain average).  A cluster whose alphas sum
to zero (no profiled token reached any member) falls back to the plain average.

The layer plan follows the ``merged_moe`` contract: ``expert_to_group`` int32 [E] maps each
original expert to a group; tuning experts come first as their own groups (ascending expert id),
then one group per merged cluster (ascending cluster id); -1 marks a dropped expert.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from flux.merging.layer_budgets import DEFAULT_VAR_FLOOR, layer_budgets
from flux.merging.kmeans import DEFAULT_ITERS, DEFAULT_PCA_DIM, fused_kmeans, pad_features, pca_features, per_layer_kmeans
from flux.merging.weighted_clusters import layer_weighted_clusters

MERGE_MODES = ("freq_attn", "freq", "avg")
# How non-tuning experts are grouped: "kmeans" = the paper's cosine K-Means on PCA features (fused
# over layers); "weighted" = frequency-weighted clustering with dropping allowed
# (flux/merging/weighted_clusters.py, docs/techniques.md "Clustering").
CLUSTERINGS = ("kmeans", "weighted")


def _vector(x: Tensor | Sequence[float], name: str, n: int | None = None) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach().cpu().double().reshape(-1)
    else:
        t = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} must have {n} entries, got {t.numel()}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {t.tolist()}")
    return t


def merge_coefficients(
    freq: Tensor | Sequence[float], attn: Tensor | Sequence[float] | None = None, mode: str = "freq_attn"
) -> Tensor:
    """Unnormalised merge weights alpha (Eq. 2).

    Args:
        freq: activation frequencies f, float [n], >= 0.
        attn: mean attention scores, float [n], >= 0; required for "freq_attn".
        mode: "freq_attn" (alpha = f * attn), "freq" (alpha = f) or "avg" (alpha = 1).

    Returns:
        float64 [n].
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    f = _vector(freq, "freq")
    if mode == "avg":
        return torch.ones_like(f)
    if mode == "freq":
        return f
    if attn is None:
        raise ValueError('mode "freq_attn" needs attention scores (attn=...)')
    return f * _vector(attn, "attn", f.numel())


def normalized_merge_weights(alpha: Tensor, clusters: Tensor) -> Tensor:
    """alpha_e / sum_{e' in c(e)} alpha_e'; plain 1/|c| where a cluster's alphas sum to zero.

    Args:
        alpha: float [E], >= 0.
        clusters: int [E], cluster id >= 0, or -1 (not merged: weight 0).

    Returns:
        float64 [E]; sums to 1 over every non-empty cluster.
    """
    alpha = _vector(alpha, "alpha")
    clusters = clusters.detach().cpu().long().reshape(-1)
    if clusters.numel() != alpha.numel():
        raise ValueError(f"clusters has {clusters.numel()} entries for {alpha.numel()} alphas")
    member = clusters >= 0
    out = torch.zeros_like(alpha)
    if not bool(member.any()):
        return out
    ids = clusters[member]
    k = int(ids.max()) + 1
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, ids, alpha[member])
    size = torch.zeros(k, dtype=torch.float64).index_add_(0, ids, torch.ones_like(alpha[member]))
    zero = total[ids] <= 0
    out[member] = torch.where(zero, 1.0 / size[ids], alpha[member] / torch.where(zero, 1.0, total[ids]))
    return out


def merge_cluster(weights: Sequence[Tensor], alpha: Tensor | Sequence[float]) -> Tensor:
    """Weighted average of one cluster's expert weights (Eq. 2).

    Args:
        weights: n >= 1 tensors of one shape (one weight matrix of each member expert).
        alpha: float [n], >= 0, unnormalised; all zero -> plain average.

    Returns:
        Tensor of the members' shape and dtype (accumulated in float64, rounded once).

    The one implementation of Eq. 2: :func:`merge_experts` and the layer handle's
    ``merged_groups`` both call it or share its accumulation.
    """
    ws = list(weights)
    if not ws:
        raise ValueError("merge_cluster needs at least one expert")
    a = normalized_merge_weights(_vector(alpha, "alpha", len(ws)), torch.zeros(len(ws), dtype=torch.long))
    acc_dtype = torch.float64  # members of similar size that cancel lose digits in fp32
    out = torch.zeros(ws[0].shape, dtype=acc_dtype, device=ws[0].device)
    with torch.no_grad():
        for w, coef in zip(ws, a.tolist()):
            if w.shape != ws[0].shape:
                raise ValueError(f"cluster members differ in shape: {tuple(w.shape)} vs {tuple(ws[0].shape)}")
            out.add_(w.detach().to(acc_dtype), alpha=coef)
    return out.to(ws[0].dtype)


def merge_experts(weights: Tensor, clusters: Tensor, alpha: Tensor, num_clusters: int | None = None) -> Tensor:
    """All clusters of one layer at once.

    Args:
        weights: stacked expert weights [E, ...] (e.g. ``gate_up_proj`` [E, 2I, H]).
        clusters: int [E]; cluster id in ``[0, K)`` or -1 (expert not merged).
        alpha: float [E] unnormalised merge weights (:func:`merge_coefficients`).
        num_clusters: K (default: max id + 1).

    Returns:
        [K, ...] in ``weights.dtype``, no autograd history (merged experts are frozen);
        accumulated in float64 like :func:`merge_cluster`.
    """
    clusters = clusters.detach().long().reshape(-1)
    num_experts = weights.shape[0]
    if clusters.numel() != num_experts:
        raise ValueError(f"clusters has {clusters.numel()} entries for {num_experts} experts")
    k = (int(clusters.max()) + 1 if num_experts else 0) if num_clusters is None else int(num_clusters)
    if num_experts and int(clusters.max()) >= k:
        raise ValueError(f"cluster id {int(clusters.max())} out of range for {k} clusters")
    coef = normalized_merge_weights(alpha, clusters).tolist()
    acc_dtype = torch.float64  # as merge_cluster: Eq. 2 accumulates in float64, rounded once
    out = torch.zeros((k, *weights.shape[1:]), dtype=acc_dtype, device=weights.device)
    with torch.no_grad():
        # One expert at a time: peak extra memory is one expert in the accumulation dtype.
        for e, c in enumerate(clusters.tolist()):
            if c >= 0:
                out[c].add_(weights[e].detach().to(acc_dtype), alpha=coef[e])
    return out.to(weights.dtype)


@dataclass
class LayerMergePlan:
    """How one layer's E experts are served by G groups.

    Attributes:
        expert_to_group: int32 [E]; group of each expert, -1 = dropped.
        tuning_experts: int64 [T]; tuning experts, ascending; expert ``tuning_experts[g]`` is
            group g.
        group_members: for merged group ``T + j``, the expert ids merged into it (ascending).
        merged_weights: name -> [G - T, ...] merged weights (frozen, same dtype as the input).
        coefficients: float64 [E]; normalised merge weight of each expert inside its group
            (1 for tuning experts, 0 for dropped ones).
    """

    expert_to_group: Tensor
    tuning_experts: Tensor
    group_members: list[list[int]]
    merged_weights: dict[str, Tensor]
    coefficients: Tensor = field(repr=False)

    @property
    def num_tuning(self) -> int:
        return int(self.tuning_experts.numel())

    @property
    def num_groups(self) -> int:
        return self.num_tuning + len(self.group_members)


def plan_layer_merge(
    weights: Mapping[str, Tensor],
    tuning_experts: Sequence[int] | Tensor,
    clusters: Sequence[int] | Tensor,
    freq: Tensor | Sequence[float] | None = None,
    attn: Tensor | Sequence[float] | None = None,
    *,
    mode: str = "freq_attn",
) -> LayerMergePlan:
    """Plan and compute one layer's merge.

    Args:
        weights: name -> stacked expert weights [E, ...], e.g. ``{"gate_up_proj": [E, 2I, H],
            "down_proj": [E, H, I]}``; every tensor is merged with the same coefficients.
        tuning_experts: ids of the tuning experts (distinct, in ``[0, E)``).
        clusters: int [E]; cluster id (>= 0) of each non-tuning expert, -1 = drop the expert;
            entries of tuning experts are ignored.  Ids need not be contiguous.
        freq: activation frequencies, float [E] (not needed for mode "avg").
        attn: mean attention scores, float [E] (needed for "freq_attn").
        mode: "freq_attn" | "freq" | "avg".

    Returns:
        :class:`LayerMergePlan`.
    """
    if not weights:
        raise ValueError("weights must name at least one stacked expert tensor")
    num_experts = next(iter(weights.values())).shape[0]
    for name, w in weights.items():
        if w.shape[0] != num_experts:
            raise ValueError(f"weights[{name!r}] has {w.shape[0]} experts, expected {num_experts}")
    tuning = torch.as_tensor(tuning_experts, dtype=torch.long).reshape(-1).cpu()
    if tuning.numel() and (int(tuning.min()) < 0 or int(tuning.max()) >= num_experts):
        raise ValueError(f"tuning expert ids must lie in [0, {num_experts}), got {tuning.tolist()}")
    if tuning.unique().numel() != tuning.numel():
        raise ValueError(f"tuning expert ids must be distinct, got {tuning.tolist()}")
    tuning = tuning.sort().values
    clus = torch.as_tensor(clusters, dtype=torch.long).reshape(-1).cpu().clone()
    if clus.numel() != num_experts:
        raise ValueError(f"clusters must have {num_experts} entries, got {clus.numel()}")
    if (clus < -1).any():
        raise ValueError("cluster ids must be >= 0, or -1 for a dropped expert")
    is_tuning = torch.zeros(num_experts, dtype=torch.bool)
    is_tuning[tuning] = True
    clus[is_tuning] = -1
    if mode == "avg" and freq is None:
        freq = torch.ones(num_experts)
    if freq is None:
        raise ValueError(f'mode "{mode}" needs activation frequencies (freq=...)')
    alpha = merge_coefficients(_vector(freq, "freq", num_experts), attn, mode)

    # Renumber clusters densely in ascending id order; group = T + dense id.
    ids = clus[clus >= 0].unique()  # sorted
    dense = torch.full_like(clus, -1)
    if ids.numel():
        lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(ids.numel())
        dense[clus >= 0] = lookup[clus[clus >= 0]]
    num_tuning = tuning.numel()
    expert_to_group = torch.where(dense >= 0, dense + num_tuning, -1)
    expert_to_group[tuning] = torch.arange(num_tuning)
    members = [torch.nonzero(dense == j).flatten().tolist() for j in range(ids.numel())]

    merged = {name: merge_experts(w, dense.to(w.device), alpha, ids.numel()) for name, w in weights.items()}
    coef = normalized_merge_weights(alpha, dense)
    coef[tuning] = 1.0
    return LayerMergePlan(expert_to_group.to(torch.int32), tuning, members, merged, coef)


def assemble_group_weights(plan: LayerMergePlan, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Full group weights [G, ...]: the live tuning-expert rows (autograd flows into ``weights``)
    followed by the frozen merged rows of ``plan``.

    Args:
        plan: from :func:`plan_layer_merge` on the same ``weights``.
        weights: name -> stacked expert weights [E, ...].
    """
    out = {}
    for name, w in weights.items():
        tuned = w.index_select(0, plan.tuning_experts.to(w.device))
        out[name] = torch.cat([tuned, plan.merged_weights[name].to(w.device, w.dtype)], 0)
    return out


def plan_model_merge(
    layer_weights: Sequence[Mapping[str, Tensor]],
    tuning_per_layer: Sequence[Sequence[int] | Tensor],
    freqs_per_layer: Sequence[Tensor | Sequence[float]],
    attn_per_layer: Sequence[Tensor | Sequence[float]] | None,
    total_budget: int | None = None,
    *,
    budgets: Sequence[int] | None = None,
    mode: str = "freq_attn",
    pca_dim: int = DEFAULT_PCA_DIM,
    iters: int = DEFAULT_ITERS,
    init: str = "kmeans++",
    seed: int = 0,
    fused: bool = True,
    var_floor: float = DEFAULT_VAR_FLOOR,
    clustering: str = "kmeans",
) -> list[LayerMergePlan]:
    """The whole merging technique for one participant: Eq. 1 budgets, PCA features of the
    non-tuning experts, one fused cosine K-Means over all layers, Eq. 2 merge per cluster
    (``clustering="kmeans"``, the paper), or per layer the frequency-weighted clustering of
    :mod:`flux.merging.weighted_clusters`, which may drop experts (``clustering="weighted"``).

    Args:
        layer_weights: per MoE layer (shallowest first), name -> stacked weights [E_l, ...].
        tuning_per_layer: per layer, the tuning expert ids.
        freqs_per_layer: per layer, activation frequencies float [E_l] (all experts: the Eq. 1
            variance is taken over the whole layer).
        attn_per_layer: per layer, mean attention scores float [E_l] (None unless "freq_attn").
        total_budget: B_non, merged groups over all layers (ignored if ``budgets`` is given).
        budgets: explicit per-layer group counts (e.g. uniform, for ablations) instead of Eq. 1.
        mode, pca_dim, iters, init, seed, var_floor: see :func:`merge_coefficients`,
            :func:`pca_features`, :func:`fused_kmeans`, :func:`layer_budgets`.
        fused: False runs the per-layer K-Means loop (same result, slower).
        clustering: one of :data:`CLUSTERINGS`.

    Returns:
        One :class:`LayerMergePlan` per layer.
    """
    if clustering not in CLUSTERINGS:
        raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {clustering!r}")
    num_layers = len(layer_weights)
    if len(tuning_per_layer) != num_layers or len(freqs_per_layer) != num_layers:
        raise ValueError("layer_weights, tuning_per_layer and freqs_per_layer need one entry per layer")
    if attn_per_layer is not None and len(attn_per_layer) != num_layers:
        raise ValueError("attn_per_layer needs one entry per layer")
    non_tuning = []
    for l, (weights, tuning) in enumerate(zip(layer_weights, tuning_per_layer)):
        num_experts = next(iter(weights.values())).shape[0]
        is_tuning = torch.zeros(num_experts, dtype=torch.bool)
        t = torch.as_tensor(tuning, dtype=torch.long).reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_experts):
            raise ValueError(f"layer {l}: tuning expert ids must lie in [0, {num_experts}), got {t.tolist()}")
        is_tuning[t] = True
        non_tuning.append(torch.nonzero(~is_tuning).flatten())
    counts = [int(n.numel()) for n in non_tuning]
    if budgets is None:
        if total_budget is None:
            raise ValueError("give total_budget (Eq. 1) or explicit per-layer budgets")
        budgets = layer_budgets([_vector(f, "freq") for f in freqs_per_layer], counts, total_budget, var_floor=var_floor)
    else:
        budgets = [int(b) for b in budgets]
        if len(budgets) != num_layers or any(b < 0 or b > n or (n > 0 and b == 0) for b, n in zip(budgets, counts)):
            raise ValueError(f"budgets {budgets} must satisfy 1 <= b_l <= n_l (n_l = {counts}; 0 where n_l = 0)")

    if clustering == "weighted":
        assignments = [
            layer_weighted_clusters([w[idx.to(w.device)] for w in weights.values()],
                                    _vector(f, "freq")[idx], b, iters=iters)
            if idx.numel() else idx
            for weights, idx, f, b in zip(layer_weights, non_tuning, freqs_per_layer, budgets)
        ]
    else:
        feats = [
            pca_features([w[idx.to(w.device)] for w in weights.values()], pca_dim)
            if idx.numel()
            else torch.zeros(0, 0, dtype=torch.float64)
            for weights, idx in zip(layer_weights, non_tuning)
        ]
        x, mask = pad_features(feats, dim=max((f.shape[1] for f in feats), default=0))
        kmeans = fused_kmeans if fused else per_layer_kmeans
        result = kmeans(x, mask, budgets, iters=iters, init=init, seed=seed)
        assignments = [result.assignments[l, : idx.numel()] for l, idx in enumerate(non_tuning)]

    plans = []
    for l, (weights, idx) in enumerate(zip(layer_weights, non_tuning)):
        num_experts = next(iter(weights.values())).shape[0]
        clusters = torch.full((num_experts,), -1, dtype=torch.long)
        clusters[idx] = assignments[l]
        attn = None if attn_per_layer is None else attn_per_layer[l]
        plans.append(plan_layer_merge(weights, tuning_per_layer[l], clusters, freqs_per_layer[l], attn, mode=mode))
    return plans
