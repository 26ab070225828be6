"""Adaptive layer-aware expert merging (FLUX technique 2).

Eq. 1 layer budgets (:mod:`.budgets`), PCA features and fused cosine K-Means over all layers
(:mod:`.kmeans`), Eq. 2 weighted merging and the per-layer merge plan (:mod:`.merge`).
"""
from flux.merging.budgets import DEFAULT_VAR_FLOOR, frequency_variance, layer_budgets
from flux.merging.kmeans import (
    DEFAULT_ITERS,
    DEFAULT_PCA_DIM,
    KMeansResult,
    fused_kmeans,
    pad_features,
    pca_features,
    per_layer_kmeans,
)
from flux.merging.merge import (
    MERGE_MODES,
    LayerMergePlan,
    assemble_group_weights,
    merge_cluster,
    merge_coefficients,
    merge_experts,
    normalized_merge_weights,
    plan_layer_merge,
    plan_model_merge,
)

__all__ = [
    "DEFAULT_ITERS",
    "DEFAULT_PCA_DIM",
    "DEFAULT_VAR_FLOOR",
    "KMeansResult",
    "LayerMergePlan",
    "MERGE_MODES",
    "assemble_group_weights",
    "frequency_variance",
    "fused_kmeans",
    "layer_budgets",
    "merge_cluster",
    "merge_coefficients",
    "merge_experts",
    "normalized_merge_weights",
    "pad_features",
    "pca_features",
    "per_layer_kmeans",
    "plan_layer_merge",
    "plan_model_merge",
]
