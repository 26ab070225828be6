"""Adaptive layer-aware expert merging (FLUX technique 2).

Eq. 1 layer budgets (:mod:`.layer_budgets`), PCA features and fused cosine K-Means over all layers
(:mod:`.kmeans`) or frequency-weighted clustering with dropping (:mod:`.weighted_clusters`), Eq. 2 weighted merging and the per-layer merge plan (:mod:`.merge`).
Plans installed on a patched model as merged views, FMES dropping, ablation budgets: :mod:`.install`.
"""
from flux.merging.layer_budgets import DEFAULT_VAR_FLOOR, frequency_variance, layer_budgets
from flux.merging.kmeans import (
    DEFAULT_ITERS,
    DEFAULT_PCA_DIM,
    KMeansResult,
    fused_kmeans,
    pad_features,
    pca_features,
    per_layer_kmeans,
)
from flux.merging.install import (
    collect_tuned,
    drop_model,
    install_merge,
    layer_weight_stacks,
    merge_model,
    single_budgets,
    uniform_budgets,
    uninstall,
)
from flux.merging.weighted_clusters import exact_features, weighted_clusters
from flux.merging.merge import (
    CLUSTERINGS,
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
    "CLUSTERINGS",
    "DEFAULT_ITERS",
    "DEFAULT_PCA_DIM",
    "DEFAULT_VAR_FLOOR",
    "KMeansResult",
    "LayerMergePlan",
    "MERGE_MODES",
    "assemble_group_weights",
    "collect_tuned",
    "drop_model",
    "exact_features",
    "frequency_variance",
    "fused_kmeans",
    "install_merge",
    "layer_budgets",
    "layer_weight_stacks",
    "merge_cluster",
    "merge_coefficients",
    "merge_experts",
    "merge_model",
    "normalized_merge_weights",
    "pad_features",
    "pca_features",
    "per_layer_kmeans",
    "plan_layer_merge",
    "plan_model_merge",
    "single_budgets",
    "uniform_budgets",
    "uninstall",
    "weighted_clusters",
]
