"""Adaptive layer-aware merging: Eq. 1 budgets, PCA, fused K-Means, Eq. 2 merge and the plan."""
from __future__ import annotations

import math

import pytest
import torch

from flux.merging import (
    assemble_group_weights,
    frequency_variance,
    fused_kmeans,
    layer_budgets,
    merge_cluster,
    merge_coefficients,
    merge_experts,
    normalized_merge_weights,
    pad_features,
    pca_features,
    per_layer_kmeans,
    plan_layer_merge,
    plan_model_merge,
)

# ------------------------------------------------------------------------------------ Eq. 1


@pytest.mark.parametrize(
    "variances, counts, total, expected",
    [
        # b = (3, 2, 1): exact shares, nothing to round
        ([1.0, 1.0, 1.0], [10, 10, 10], 6, [3, 2, 1]),
        # shares 3.5, 2.33, 1.17 -> floors 3, 2, 1, remainder 1 to the largest fraction (layer 0)
        ([1.0, 1.0, 1.0], [10, 10, 10], 7, [4, 2, 1]),
        # b = (3/0.5, 2/2, 1/1) = (6, 1, 1): shares exactly 6, 1, 1
        ([0.5, 2.0, 1.0], [10, 10, 10], 8, [6, 1, 1]),
        # same b, B=10: shares 7.5, 1.25, 1.25 -> 7, 1, 1 + 1 to layer 0
        ([0.5, 2.0, 1.0], [10, 10, 10], 10, [8, 1, 1]),
        # b = (2/1, 1/0.5) = (2, 2), B=5: shares 2.5, 2.5 -> tie in fraction and b -> shallower
        ([1.0, 0.5], [10, 10], 5, [3, 2]),
        # upper clamp: layer 0 capped at its 2 non-tuning experts, the other 5 split 2:1
        # (3.33, 1.67) -> 3, 1 + 1 to layer 2 (fraction .67 > .33)
        ([1.0, 1.0, 1.0], [2, 10, 10], 7, [2, 3, 2]),
        # lower clamp: b = (3, 2, 0.01); layer 2's share 0.01 is raised to 1, the other 4 split
        # 3:2 = (2.4, 1.6) -> 2, 1 + 1 to layer 1
        ([1.0, 1.0, 100.0], [10, 10, 10], 5, [2, 2, 1]),
        # zero variance: flat layer 0 saturates at 4; the other 4 split 2:1 -> 2.67, 1.33 -> 3, 1
        ([0.0, 1.0, 1.0], [4, 10, 10], 8, [4, 3, 1]),
        # all flat: equal floors, depth weights decide
        ([0.0, 0.0, 0.0], [10, 10, 10], 6, [3, 2, 1]),
        # a layer without non-tuning experts gets 0 and no share
        ([1.0, 1.0, 1.0], [0, 3, 3], 2, [0, 1, 1]),
        ([1.0, 1.0, 1.0], [0, 3, 3], 6, [0, 3, 3]),
        # budget == number of layers: one each
        ([1e-4, 1.0, 1.0], [5, 5, 5], 3, [1, 1, 1]),
        # nothing to merge anywhere
        ([1.0, 1.0], [0, 0], 0, [0, 0]),
    ],
)
def test_layer_budgets_hand_computed(variances, counts, total, expected):
    assert layer_budgets(variances, counts, total) == expected


def test_layer_budgets_from_frequencies():
    assert frequency_variance([0.9, 0.1]) == pytest.approx(0.16)
    assert frequency_variance(torch.tensor([0.25, 0.25, 0.25, 0.25])) == 0.0
    # variances (0, 0.16): flat layer 0 saturates
    assert layer_budgets([torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])], [2, 2], 3) == [2, 1]
    freqs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
    v = [frequency_variance(f) for f in freqs]
    assert layer_budgets(freqs, [4, 4], 5) == layer_budgets(torch.tensor(v), [4, 4], 5)
    # list of per-layer lists (different expert counts)
    assert sum(layer_budgets([[0.5, 0.5], [0.6, 0.2, 0.2]], [2, 3], 4)) == 4


def test_layer_budgets_match_eq1_floor_without_clamps():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        num_layers = int(torch.randint(2, 12, (1,), generator=gen))
        var = (torch.rand(num_layers, generator=gen, dtype=torch.float64) + 0.5).tolist()
        total = int(torch.randint(num_layers * 4, num_layers * 8, (1,), generator=gen))
        counts = [10_000] * num_layers
        b = [(num_layers - i) / v for i, v in enumerate(var)]
        floors = [math.floor(x / sum(b) * total) for x in b]
        if min(floors) < 1:
            continue  # a lower clamp would be active
        got = layer_budgets(var, counts, total)
        assert sum(got) == total
        assert all(0 <= g - f <= 1 for g, f in zip(got, floors)), (got, floors)
        # the remainder goes to the largest fractions
        fracs = [x / sum(b) * total - f for x, f in zip(b, floors)]
        bumped = [i for i in range(num_layers) if got[i] > floors[i]]
        if bumped:
            assert min(fracs[i] for i in bumped) >= max((fracs[i] for i in range(num_layers) if i not in bumped), default=-1) - 1e-12


def test_layer_budgets_bounds_random():
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        num_layers = int(torch.randint(1, 10, (1,), generator=gen))
        counts = torch.randint(0, 8, (num_layers,), generator=gen).tolist()
        var = (torch.rand(num_layers, generator=gen) ** 4).tolist()
        var[0] = 0.0 if num_layers > 2 else var[0]
        active = sum(1 for n in counts if n)
        if sum(counts) == 0:
            continue
        total = int(torch.randint(active, sum(counts) + 1, (1,), generator=gen))
        got = layer_budgets(var, counts, total)
        assert sum(got) == total
        for g, n in zip(got, counts):
            assert (g == 0) if n == 0 else (1 <= g <= n)


def test_layer_budgets_shallow_and_flat_layers_keep_more():
    # equal variances: non-increasing with depth
    got = layer_budgets([1.0] * 6, [16] * 6, 30)
    assert got == sorted(got, reverse=True)
    # same depth weight, flatter layer gets more
    assert layer_budgets([0.01, 0.001], [16, 16], 10)[1] > 2


@pytest.mark.parametrize(
    "args, message",
    [
        (([1.0, 1.0], [3, 3], -1), "must be >= 0"),
        (([1.0, 1.0], [3, 3], 7), "exceeds the 6 non-tuning experts"),
        (([1.0, 1.0], [3, 3], 1), "smaller than the 2 layers"),
        (([1.0, 1.0], [3], 2), "non-tuning counts"),
        (([1.0, -1.0], [3, 3], 2), "variances must be finite and >= 0"),
        (([1.0, 1.0], [3, -3], 2), "ints >= 0"),
        (([1.0, 1.0], [3, 3], 2.5), "must be an int"),
    ],
)
def test_layer_budgets_errors(args, message):
    with pytest.raises(ValueError, match=message):
        layer_budgets(*args)


# ------------------------------------------------------------------------------------ PCA


def test_pca_features_preserve_centered_geometry():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 7, generator=gen, dtype=torch.float64)
    f = pca_features(w, dim=16)
    assert f.shape == (6, 6) and f.dtype == torch.float64
    x = w.reshape(6, -1)
    xc = x - x.mean(0)
    torch.testing.assert_close(f @ f.T, xc @ xc.T)  # exact PCA scores: same Gram matrix
    # several tensors == their concatenation
    a, b = torch.randn(6, 3, 4, generator=gen), torch.randn(6, 5, generator=gen)
    fab = pca_features([a, b], dim=4)
    fcat = pca_features(torch.cat([a.reshape(6, -1), b], 1), dim=4)
    torch.testing.assert_close(fab, fcat, rtol=1e-5, atol=1e-5)  # fp32 chunk products
    # truncation keeps the leading components (descending variance)
    f2 = pca_features(w, dim=2)
    assert f2.shape == (6, 2)
    var = f.pow(2).sum(0)
    assert (var[:-1] >= var[1:] - 1e-9).all()
    torch.testing.assert_close(f2.abs(), f[:, :2].abs())


def test_pca_features_errors_and_edge_cases():
    assert pca_features(torch.zeros(0, 3)).shape == (0, 0)
    assert pca_features(torch.randn(1, 3)).abs().max() == 0  # one expert: nothing to explain
    with pytest.raises(ValueError, match="dim"):
        pca_features(torch.randn(3, 3), dim=0)
    with pytest.raises(ValueError, match="same expert count"):
        pca_features([torch.randn(3, 3), torch.randn(2, 3)])


# ------------------------------------------------------------------------------------ K-Means


def _random_layers(gen, num_layers, dim, max_n=30, duplicates=False):
    feats, ks = [], []
    for _ in range(num_layers):
        n = int(torch.randint(0, max_n, (1,), generator=gen))
        f = torch.randn(n, dim, generator=gen)
        if duplicates and n > 4:
            f[1] = f[0]
            f[3] = 2.5 * f[2]  # same direction: cosine distance 0
        feats.append(f)
        ks.append(int(torch.randint(1, max(2, n + 3), (1,), generator=gen)))  # includes k >= n
    return feats, ks


@pytest.mark.parametrize("init", ["kmeans++", "farthest"])
def test_fused_kmeans_equals_per_layer(init):
    gen = torch.Generator().manual_seed(123)
    for trial in range(30):
        num_layers = int(torch.randint(1, 8, (1,), generator=gen))
        dim = int(torch.randint(1, 17, (1,), generator=gen))
        feats, ks = _random_layers(gen, num_layers, dim, duplicates=trial % 2 == 0)
        x, mask = pad_features(feats)
        fused = fused_kmeans(x, mask, ks, init=init, seed=trial)
        loop = per_layer_kmeans(x, mask, ks, init=init, seed=trial)
        assert torch.equal(fused.assignments, loop.assignments), (trial, ks)
        assert torch.equal(fused.centroids, loop.centroids)
        assert fused.iterations == loop.iterations
        for l, f in enumerate(feats):
            n = f.shape[0]
            a = fused.assignments[l]
            assert (a[n:] == -1).all()
            if n:  # exactly min(k, n) non-empty clusters
                assert set(a[:n].tolist()) == set(range(min(ks[l], n)))


def test_fused_kmeans_larger_model_shape():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, 64, 16, generator=gen, dtype=torch.float64)
    mask = torch.ones(16, 64, dtype=torch.bool)
    ks = torch.randint(1, 40, (16,), generator=gen).tolist()
    assert torch.equal(fused_kmeans(x, mask, ks).assignments, per_layer_kmeans(x, mask, ks).assignments)


@pytest.mark.parametrize("init", ["kmeans++", "farthest"])
def test_kmeans_recovers_direction_clusters(init):
    gen = torch.Generator().manual_seed(0)
    dirs0 = torch.eye(2)
    dirs1 = torch.eye(3)
    pts0 = torch.cat([dirs0[i] + 0.05 * torch.randn(5, 2, generator=gen) for i in range(2)])
    # layer 1: scaled copies (cosine ignores norms)
    pts1 = torch.cat([(i + 1.0) * (dirs1[i] + 0.05 * torch.randn(4, 3, generator=gen)) for i in range(3)])
    x, mask = pad_features([pts0, pts1], dim=3)
    res = fused_kmeans(x, mask, [2, 3], init=init)
    a0, a1 = res.assignments[0, :10], res.assignments[1]
    assert len(set(a0[:5].tolist())) == 1 and len(set(a0[5:].tolist())) == 1 and a0[0] != a0[5]
    groups = [set(a1[i * 4:(i + 1) * 4].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3


def test_kmeans_layers_are_independent():
    gen = torch.Generator().manual_seed(3)
    feats, ks = _random_layers(gen, 4, 5)
    feats[0] = torch.randn(12, 5, generator=gen)
    ks[0] = 4
    x, mask = pad_features(feats)
    base = fused_kmeans(x, mask, ks, init="farthest").assignments[0]
    x2 = x.clone()
    x2[1:] = torch.randn(x2[1:].shape, generator=gen, dtype=torch.float64)  # other layers change
    assert torch.equal(fused_kmeans(x2, mask, ks, init="farthest").assignments[0], base)
    alone, m = pad_features([feats[0]])
    assert torch.equal(fused_kmeans(alone, m, [4], init="farthest").assignments[0], base[:12])


def test_kmeans_k_at_least_n_and_empty_clusters():
    x, mask = pad_features([torch.randn(3, 4), torch.ones(4, 4), torch.zeros(0, 4)])
    res = fused_kmeans(x, mask, [5, 2, 3])
    assert res.assignments[0].tolist() == [0, 1, 2, -1]  # k >= n: one cluster per point
    # four identical points, k=2: the second cluster would stay empty; repair fills it
    assert sorted(res.assignments[1].tolist()) == [0, 0, 0, 1]
    assert (res.assignments[2] == -1).all()
    assert torch.equal(res.assignments, per_layer_kmeans(x, mask, [5, 2, 3]).assignments)


def test_kmeans_errors():
    x, mask = pad_features([torch.randn(3, 2)])
    with pytest.raises(ValueError, match="k=0"):
        fused_kmeans(x, mask, [0])
    with pytest.raises(ValueError, match="k_per_layer"):
        fused_kmeans(x, mask, [1, 1])
    with pytest.raises(ValueError, match="prefix"):
        fused_kmeans(x, torch.tensor([[False, True, True]]), [1])
    with pytest.raises(ValueError, match="init"):
        fused_kmeans(x, mask, [1], init="random")


# ------------------------------------------------------------------------------------ Eq. 2


def test_merge_coefficients_hand_computed():
    f = [0.2, 0.3, 0.5]
    attn = [0.5, 1.0, 0.2]
    alpha = merge_coefficients(f, attn, "freq_attn")
    torch.testing.assert_close(alpha, torch.tensor([0.1, 0.3, 0.1], dtype=torch.float64))
    one = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(normalized_merge_weights(alpha, one), torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64))
    torch.testing.assert_close(normalized_merge_weights(merge_coefficients(f, mode="freq"), one), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    torch.testing.assert_close(normalized_merge_weights(merge_coefficients(f, mode="avg"), one), torch.full((3,), 1 / 3, dtype=torch.float64))
    # two clusters, one with zero alpha -> plain average there; -1 gets weight 0
    coef = normalized_merge_weights(torch.tensor([1.0, 3.0, 0.0, 0.0, 5.0]), torch.tensor([0, 0, 1, 1, -1]))
    torch.testing.assert_close(coef, torch.tensor([0.25, 0.75, 0.5, 0.5, 0.0], dtype=torch.float64))


def test_merge_cluster_and_experts_hand_computed():
    w = [torch.full((2, 3), 1.0), torch.full((2, 3), 2.0), torch.full((2, 3), 4.0)]
    # alpha = (0.1, 0.3, 0.1) -> (0.2, 0.6, 0.2): 0.2 + 1.2 + 0.8 = 2.2
    merged = merge_cluster(w, merge_coefficients([0.2, 0.3, 0.5], [0.5, 1.0, 0.2]))
    torch.testing.assert_close(merged, torch.full((2, 3), 2.2))
    torch.testing.assert_close(merge_cluster(w, [0.0, 0.0, 0.0]), torch.full((2, 3), 7 / 3))  # fallback
    stacked = torch.stack(w + [torch.full((2, 3), 10.0)])  # [4, 2, 3]
    out = merge_experts(stacked, torch.tensor([1, 0, 1, -1]), torch.tensor([1.0, 1.0, 3.0, 1.0]))
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out[0], torch.full((2, 3), 2.0))
    torch.testing.assert_close(out[1], torch.full((2, 3), 0.25 * 1 + 0.75 * 4))
    bf = merge_experts(stacked.bfloat16(), torch.tensor([0, 0, 0, 0]), torch.ones(4))
    assert bf.dtype == torch.bfloat16 and float(bf[0, 0, 0]) == pytest.approx(17 / 4, rel=1e-2)


def test_merge_errors():
    with pytest.raises(ValueError, match="mode"):
        merge_coefficients([1.0], mode="median")
    with pytest.raises(ValueError, match="attention"):
        merge_coefficients([1.0], None, "freq_attn")
    with pytest.raises(ValueError, match=">= 0"):
        merge_coefficients([1.0, -0.1], mode="freq")
    with pytest.raises(ValueError, match="entries"):
        merge_coefficients([1.0, 1.0], [1.0], "freq_attn")


def test_plan_layer_merge_hand_computed():
    num_experts = 5
    gate_up = torch.arange(num_experts, dtype=torch.float32).reshape(-1, 1, 1).expand(num_experts, 4, 3).contiguous()
    down = -gate_up[:, :3, :2].contiguous()
    weights = {"gate_up_proj": gate_up, "down_proj": down}
    freq = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.3])
    attn = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0])
    # tuning experts 3 and 1 (given unsorted); clusters: id 2 = {2}, id 5 = {0, 4}
    plan = plan_layer_merge(weights, [3, 1], [5, 9, 2, 9, 5], freq, attn)
    assert plan.expert_to_group.dtype == torch.int32
    assert plan.expert_to_group.tolist() == [3, 0, 2, 1, 3]
    assert plan.tuning_experts.tolist() == [1, 3] and plan.num_tuning == 2 and plan.num_groups == 4
    assert plan.group_members == [[2], [0, 4]]
    # cluster {0, 4}: alpha = (0.1, 0.9) -> (0.1, 0.9); W = 0.1 * 0 + 0.9 * 4 = 3.6
    torch.testing.assert_close(plan.merged_weights["gate_up_proj"][1], torch.full((4, 3), 3.6))
    torch.testing.assert_close(plan.merged_weights["gate_up_proj"][0], torch.full((4, 3), 2.0))
    torch.testing.assert_close(plan.merged_weights["down_proj"][1], torch.full((3, 2), -3.6))
    torch.testing.assert_close(plan.coefficients, torch.tensor([0.1, 1.0, 1.0, 1.0, 0.9], dtype=torch.float64))
    # modes
    plan_f = plan_layer_merge(weights, [3, 1], [5, 9, 2, 9, 5], freq, mode="freq")
    torch.testing.assert_close(plan_f.merged_weights["gate_up_proj"][1], torch.full((4, 3), 0.75 * 4))
    plan_a = plan_layer_merge(weights, [3, 1], [5, 9, 2, 9, 5], mode="avg")
    torch.testing.assert_close(plan_a.merged_weights["gate_up_proj"][1], torch.full((4, 3), 2.0))
    # a dropped expert and no tuning experts
    plan_d = plan_layer_merge(weights, [], [0, 0, -1, 1, 1], freq, attn)
    assert plan_d.expert_to_group.tolist() == [0, 0, -1, 1, 1]


def test_plan_layer_merge_errors():
    weights = {"w": torch.randn(3, 2)}
    with pytest.raises(ValueError, match="distinct"):
        plan_layer_merge(weights, [1, 1], [0, 0, 0], [1.0] * 3, mode="freq")
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        plan_layer_merge(weights, [3], [0, 0, 0], [1.0] * 3, mode="freq")
    with pytest.raises(ValueError, match="3 entries"):
        plan_layer_merge(weights, [], [0, 0], [1.0] * 3, mode="freq")


def test_assemble_group_weights_gradients_reach_tuning_experts_only():
    w = torch.randn(4, 3, 2, requires_grad=True)
    plan = plan_layer_merge({"w": w}, [2], [0, 0, 9, 1], torch.ones(4), torch.ones(4))
    groups = assemble_group_weights(plan, {"w": w})["w"]
    assert groups.shape == (3, 3, 2)
    torch.testing.assert_close(groups[0], w[2])
    groups.sum().backward()
    assert w.grad[2].eq(1).all() and w.grad[[0, 1, 3]].eq(0).all()


@pytest.mark.parametrize("mode", ["freq_attn", "freq", "avg"])
def test_plan_model_merge_end_to_end(mode):
    gen = torch.Generator().manual_seed(0)
    num_layers, num_experts, hidden, inter = 4, 8, 6, 4
    layers = [
        {"gate_up_proj": torch.randn(num_experts, 2 * inter, hidden, generator=gen), "down_proj": torch.randn(num_experts, hidden, inter, generator=gen)}
        for _ in range(num_layers)
    ]
    tuning = [[0, 5], [], [1, 2, 3], list(range(num_experts))]
    freqs = [torch.rand(num_experts, generator=gen) for _ in range(num_layers)]
    attn = [torch.rand(num_experts, generator=gen) for _ in range(num_layers)]
    plans = plan_model_merge(layers, tuning, freqs, attn, total_budget=10, mode=mode, pca_dim=4)
    counts = [num_experts - len(t) for t in tuning]
    expected = layer_budgets(freqs, counts, 10)
    for plan, t, b in zip(plans, tuning, expected):
        assert plan.num_tuning == len(t) and plan.num_groups == len(t) + b
        e2g = plan.expert_to_group
        assert (e2g >= 0).all() and e2g.max() == plan.num_groups - 1
        assert e2g[torch.tensor(t, dtype=torch.long)].tolist() == list(range(len(t)))
    loop = plan_model_merge(layers, tuning, freqs, attn, total_budget=10, mode=mode, pca_dim=4, fused=False)
    for a, b in zip(plans, loop):
        assert torch.equal(a.expert_to_group, b.expert_to_group)
        for name in a.merged_weights:
            assert torch.equal(a.merged_weights[name], b.merged_weights[name])
    uniform = plan_model_merge(layers, tuning, freqs, attn, budgets=[2, 2, 2, 0], mode=mode)
    assert [p.num_groups - p.num_tuning for p in uniform] == [2, 2, 2, 0]
    with pytest.raises(ValueError, match="budgets"):
        plan_model_merge(layers, tuning, freqs, attn, budgets=[0, 2, 2, 0], mode=mode)
