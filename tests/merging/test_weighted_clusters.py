"""Frequency-weighted clustering with a drop option (flux/merging/weighted_clusters.py)."""
from __future__ import annotations

import pytest
import torch

from flux.federation.config import CLUSTERINGS as CONFIG_CLUSTERINGS, load_config
from flux.federation.errors import ConfigError
from flux.merging import CLUSTERINGS, exact_features, plan_model_merge, weighted_clusters


def _objective(x: torch.Tensor, w: torch.Tensor, assign: torch.Tensor) -> float:
    """sum_e w_e * (||x_e - c(e)||^2, or ||x_e||^2 if dropped), c = the weighted cluster mean."""
    total = 0.0
    for e in range(x.shape[0]):
        if assign[e] < 0:
            total += float(w[e] * x[e].pow(2).sum())
        else:
            members = assign == assign[e]
            c = (w[members, None] * x[members]).sum(0) / w[members].sum()
            total += float(w[e] * (x[e] - c).pow(2).sum())
    return total


def _keep_top_k(w: torch.Tensor, k: int) -> torch.Tensor:
    """The FMES-like layout: the k heaviest points alone, every other one dropped."""
    assign = torch.full((w.numel(),), -1, dtype=torch.long)
    assign[torch.sort(-w, stable=True).indices[:k]] = torch.arange(k)
    return assign


@pytest.mark.parametrize("n, k", [(7, 1), (7, 3), (13, 5), (13, 12), (31, 4), (64, 8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_worse_than_keeping_the_top_k_and_dropping_the_rest(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    # points around a shared offset: merging is worth something for some, not for others
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64) + 1.5 * torch.randn(1, 6, generator=gen,
                                                                                    dtype=torch.float64)
    w = torch.rand(n, generator=gen, dtype=torch.float64) ** 3
    assign = weighted_clusters(x, w, k)
    assert assign.shape == (n,) and assign.dtype == torch.long
    assert int(assign.min()) >= -1 and int(assign.max()) < k
    assert _objective(x, w, assign) <= _objective(x, w, _keep_top_k(w, k)) + 1e-9
    # a local optimum: no single point gains by moving to another option
    centroids = {int(j): (w[assign == j, None] * x[assign == j]).sum(0) / w[assign == j].sum()
                 for j in assign.unique().tolist() if j >= 0}
    for e in range(n):
        if w[e] == 0:
            continue
        here = float(x[e].pow(2).sum()) if assign[e] < 0 else float((x[e] - centroids[int(assign[e])]).pow(2).sum())
        others = [float(x[e].pow(2).sum())] + [float((x[e] - c).pow(2).sum()) for c in centroids.values()]
        assert here <= min(others) + 1e-9


def test_similar_experts_merge_and_orthogonal_ones_are_dropped():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    # two families of near-copies (experts upcycled from one FFN each): they merge, none dropped
    copies = torch.cat([base[0] + 0.01 * torch.randn(3, 50, generator=gen, dtype=torch.float64),
                        base[1] + 0.01 * torch.randn(3, 50, generator=gen, dtype=torch.float64)])
    assign = weighted_clusters(copies, torch.tensor([0.3, 0.1, 0.1, 0.2, 0.2, 0.1], dtype=torch.float64), 2)
    assert (assign >= 0).all()
    assert len(set(assign[:3].tolist())) == 1 and len(set(assign[3:].tolist())) == 1
    assert assign[0] != assign[3]
    # orthonormal experts: an average serves each worse (distance^2 1.5+) than dropping (1): the
    # heaviest stays whole, the others are dropped
    eye = torch.eye(5, dtype=torch.float64)
    assign = weighted_clusters(eye, torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1], dtype=torch.float64), 1)
    assert assign.tolist() == [-1, 0, -1, -1, -1]


def test_edge_cases_and_errors():
    x = torch.randn(4, 3, dtype=torch.float64)
    assert weighted_clusters(x, torch.ones(4), 4).tolist() == [0, 1, 2, 3]
    assert weighted_clusters(x, torch.ones(4), 9).tolist() == [0, 1, 2, 3]
    assert weighted_clusters(x, torch.zeros(4), 2).tolist() == [0, 0, 0, 0]  # nothing routed: keep serving
    assert weighted_clusters(torch.zeros(0, 3), torch.zeros(0), 1).numel() == 0
    with pytest.raises(ValueError, match="entries"):
        weighted_clusters(x, torch.ones(3), 2)
    with pytest.raises(ValueError, match=">= 0"):
        weighted_clusters(x, torch.tensor([1.0, -1.0, 0.0, 0.0]), 2)
    with pytest.raises(ValueError, match="k must be"):
        weighted_clusters(x, torch.ones(4), 0)


def test_exact_features_keep_norms_and_distances():
    gen = torch.Generator().manual_seed(3)
    gate_up = torch.randn(6, 8, 4, generator=gen)
    down = torch.randn(6, 4, 4, generator=gen)
    flat = torch.cat([gate_up.reshape(6, -1), down.reshape(6, -1)], 1).double()
    feats = exact_features([gate_up, down])
    assert feats.shape == (6, 6)
    torch.testing.assert_close(feats.norm(dim=1), flat.norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cdist(feats, feats), torch.cdist(flat, flat), rtol=1e-5, atol=1e-5)


def test_plan_model_merge_weighted_drops_and_respects_budgets():
    gen = torch.Generator().manual_seed(5)
    layers = [{"gate_up": torch.randn(e, 8, 4, generator=gen), "down": torch.randn(e, 4, 4, generator=gen)}
              for e in (7, 5)]  # prime and odd expert counts, experts nearly orthogonal
    freqs = [torch.rand(e, generator=gen, dtype=torch.float64) + 0.01 for e in (7, 5)]
    tuning = [[0, 3], [4]]
    plans = plan_model_merge(layers, tuning, freqs, None, budgets=[2, 1], mode="freq", clustering="weighted")
    for plan, tun, b, f, n in zip(plans, tuning, [2, 1], freqs, (7, 5)):
        assert plan.tuning_experts.tolist() == tun
        assert 1 <= plan.num_groups - plan.num_tuning <= b
        dropped = (plan.expert_to_group < 0).nonzero().flatten().tolist()
        assert dropped and not set(dropped) & set(tun)
        # the heaviest non-tuning expert is never the one dropped
        rest = [e for e in range(n) if e not in tun]
        assert max(rest, key=lambda e: float(f[e])) not in dropped
    with pytest.raises(ValueError, match="clustering"):
        plan_model_merge(layers, tuning, freqs, None, budgets=[2, 1], mode="freq", clustering="spectral")


def test_config_option():
    assert CONFIG_CLUSTERINGS == CLUSTERINGS
    assert load_config(overrides=["flux.merge_clustering=weighted"]).flux.merge_clustering == "weighted"
    with pytest.raises(ConfigError, match="merge_clustering"):
        load_config(overrides=["flux.merge_clustering=spectral"])
