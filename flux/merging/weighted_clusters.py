"""Frequency-weighted clustering of non-tuning experts, where dropping an expert is an option.

The paper clusters a layer's non-tuning experts by cosine K-Means on PCA features and merges
each cluster by Eq. 2.  That clustering ignores how much each expert matters and never asks
whether averaging helps at all: when two experts are far apart in weight space (experts trained
from different random initialisations are almost orthogonal), their average serves both worse
than keeping one whole and dropping the other.  ``flux ablate`` measured it (sarcasm,
mixtral-tiny): merged-model output error 0.250 for the paper's clustering, 0.170 for keeping the
most frequent experts whole and dropping the rest (docs/techniques.md, "Clustering").

This module clusters by the error the merge itself makes.  With point weights w_e (the expert's
activation frequency: the share of the layer's tokens it serves) and centroids c_j, it minimises

    sum_e w_e * min( min_j ||W_e - c_j||^2 ,  ||W_e||^2 )

by weighted Lloyd iterations: the second term is a free zero centroid (the expert is dropped and
contributes nothing, as FMES's dropped experts), and a cluster's centroid is its w-weighted mean
(Eq. 2 with alpha = f; the installed merge still uses ``flux.merge_mode``'s coefficients, which
differ only inside clusters of two or more members).  It starts from the k heaviest experts as singleton centroids, which is
exactly the keep-the-top-k-and-drop layout, and a Lloyd step never increases the objective, so
the result is never worse than that layout in this objective; where experts are similar (e.g.
experts upcycled from one dense FFN) they still merge.

Distances are taken on exact, uncentred Gram-matrix features (:func:`pca_features` with every
component), so ``||W_e||`` and ``||W_e - W_f||`` are those of the flattened weights.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from flux.merging.kmeans import DEFAULT_ITERS, pca_features

DROPPED = -1


def exact_features(weights: Sequence[Tensor]) -> Tensor:
    """Uncentred features whose norms and pairwise distances equal those of the experts'
    flattened weights (all of ``weights`` concatenated).

    Args:
        weights: tensors [n, ...] of one layer's n experts (row i = expert i), any float dtype.

    Returns:
        float64 [n, n].
    """
    n = weights[0].shape[0]
    return pca_features(list(weights), dim=max(n, 1), center=False)


def weighted_clusters(features: Tensor, weights: Tensor, k: int, *, iters: int = DEFAULT_ITERS) -> Tensor:
    """Cluster n points into at most ``k`` weighted clusters or drop them (module docstring).

    Args:
        features: float [n, D] (e.g. :func:`exact_features`).
        weights: float [n], >= 0: each point's importance (activation frequency).  All zero is
            allowed (nothing is served: every point keeps a plain-average cluster, none is dropped).
        k: number of clusters, >= 1 (``k >= n``: every point is its own cluster).
        iters: maximum Lloyd iterations; stops when no assignment changes.

    Returns:
        int64 [n]: cluster id in ``[0, k)`` or ``-1`` (dropped).  Cluster ids follow the seeds:
        cluster j started at the j-th heaviest point (ties: lower index first); a cluster that
        lost every point is left empty (the caller's groups are renumbered densely).
    """
    x = features.detach().double().cpu()
    w = weights.detach().double().cpu().reshape(-1)
    n = x.shape[0]
    if w.numel() != n:
        raise ValueError(f"weights has {w.numel()} entries for {n} points")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and >= 0")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if k >= n:
        return torch.arange(n)
    if float(w.sum()) == 0.0:
        # no token reaches any of them: the objective is flat, keep them served (plain average)
        return torch.zeros(n, dtype=torch.long)
    order = torch.sort(-w, stable=True).indices
    centroids = x[order[:k]].clone()
    assign = torch.full((n,), -2, dtype=torch.long)
    drop_cost = (x * x).sum(1)
    for _ in range(iters):
        dist = torch.cdist(x, centroids).pow(2)  # [n, k]
        best, nearest = dist.min(1)
        new = torch.where(drop_cost < best, torch.full_like(nearest, DROPPED), nearest)
        if torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = assign == j
            mass = float(w[members].sum())
            if mass > 0:
                centroids[j] = (w[members, None] * x[members]).sum(0) / mass
    return assign


def layer_weighted_clusters(stacks: Sequence[Tensor], frequencies: Tensor, k: int, *,
                            iters: int = DEFAULT_ITERS) -> Tensor:
    """:func:`weighted_clusters` of one layer's experts.

    Args:
        stacks: the experts' weight tensors [n, ...] (e.g. ``gate_up[idx]`` and ``down[idx]``).
        frequencies: float [n] activation frequencies of the same experts.
        k: the layer's merged-group budget.

    Returns:
        int64 [n]: cluster id or -1 (dropped).
    """
    return weighted_clusters(exact_features(stacks), frequencies, k, iters=iters)
