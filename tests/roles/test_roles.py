"""Dynamic role assignment: Eq. 3 utilities, Eq. 4 selection, epsilon schedule, SPSA."""
from __future__ import annotations

import math

import pytest
import torch

from flux.roles import (
    EpsilonSchedule,
    activation_utilities,
    assign_roles,
    cosine_distance,
    expert_utility,
    per_sample_grad_sq_norms,
    select_top_b,
    spsa_gradient,
    split_budget,
    utilities_from_grad_norms,
    utility_from_sums,
)

# ------------------------------------------------------------------------------------ Eq. 3


def _linear_loss(params, x, y):
    return 0.5 * (params["w"] @ x - y) ** 2


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_per_sample_grad_norms_tiny_expert(method):
    # loss_k = 0.5 (w.x_k - y_k)^2, g_k = (w.x_k - y_k) x_k, w = (1, 2)
    #   x=(1,0), y=0: r=1, g=(1,0) -> 1;  x=(0,1), y=1: r=1, g=(0,1) -> 1;  x=(1,1), y=1: r=2, g=(2,2) -> 8
    params = {"w": torch.tensor([1.0, 2.0])}
    xs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ys = torch.tensor([0.0, 1.0, 1.0])
    sq = per_sample_grad_sq_norms(_linear_loss, params, (xs, ys), method=method)
    torch.testing.assert_close(sq, torch.tensor([1.0, 1.0, 8.0]))
    # u = |D| sqrt(mean) = 3 sqrt(10/3) = sqrt(30)
    assert expert_utility(sq) == pytest.approx(math.sqrt(30))
    assert params["w"].grad is None


def _moe_loss(params, x, gate, y):
    # two experts w_e [2]; output = sum_e gate_e * (w_e . x)
    out = (gate * (params["w"] @ x)).sum()
    return 0.5 * (out - y) ** 2


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_utility_tiny_moe_hand_computed(method):
    # W = [[1, 0], [0, 1]]; per-sample grad of expert e: dL/dw_e = r * gate_e * x
    params = {"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    xs = torch.tensor([[1.0, 2.0], [2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    gates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    ys = torch.tensor([0.0, 1.0, 0.0, 1.0])
    # sample 0: out = 1, r = 1: g_0 = (1, 2) -> |g|^2 = 5; expert 1 gets 0
    # sample 1: out = 2, r = 1: g_0 = (2, 0) -> 4
    # sample 2: out = 0.5*1 + 0.5*1 = 1, r = 1: g_0 = g_1 = 0.5*(1, 1) -> 0.5 each
    # sample 3: out = 3, r = 2: g_1 = 2*(0, 3) -> 36
    expected = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.5, 0.5], [0.0, 36.0]])
    sq = per_sample_grad_sq_norms(_moe_loss, params, (xs, gates, ys), expert_dim=0, method=method)
    torch.testing.assert_close(sq, expected)
    util = utilities_from_grad_norms(sq, routed=gates > 0)
    # expert 0: D = {0, 1, 2}: sqrt(3 * 9.5); expert 1: D = {2, 3}: sqrt(2 * 36.5)
    torch.testing.assert_close(util, torch.tensor([math.sqrt(28.5), math.sqrt(73.0)], dtype=torch.float64))
    torch.testing.assert_close(utilities_from_grad_norms(sq), util)  # default routing: sq > 0
    # a routed sample with zero gradient still counts in |D_e|
    routed = torch.tensor([[True, False], [True, True], [True, True], [False, True]])
    torch.testing.assert_close(utilities_from_grad_norms(sq, routed)[1], torch.tensor(math.sqrt(3 * 36.5), dtype=torch.float64))


def test_utility_edge_cases_and_round_one():
    assert expert_utility([]) == 0.0
    assert utilities_from_grad_norms(torch.zeros(3, 2)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=">= 0"):
        expert_utility([1.0, -1.0])
    u = activation_utilities([torch.tensor([2.0, 6.0, 0.0, 2.0]), [0.0, 0.0], torch.tensor([0.1, 0.3])])
    torch.testing.assert_close(u[0], torch.tensor([0.2, 0.6, 0.0, 0.2], dtype=torch.float64))
    assert u[1].tolist() == [0.0, 0.0]
    torch.testing.assert_close(u[2], torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_utility_from_sums_is_the_engines_formula_bitwise():
    """Eq. 3 has one home: the value is exactly the engine's former inline
    ``float((d_e * sq) ** 0.5)``, for scaled (non-integer) counts too."""
    g = torch.Generator().manual_seed(0)
    counts = (torch.rand(200, generator=g, dtype=torch.float64) * 50).tolist() + [0.0, 1.0, 3.0]
    sums = (torch.rand(203, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (203,), generator=g)).tolist()
    for d, sq in zip(counts, sums):
        assert utility_from_sums(d, sq) == float((d * float(sq)) ** 0.5)
    assert utility_from_sums(0.0, 5.0) == 0.0


def test_utility_from_sums_propagates_non_finite_and_rejects_negative():
    # a diverged participant: NaN utility, rejected by the server's update validation (not a crash)
    assert math.isnan(utility_from_sums(3.0, float("nan")))
    assert math.isinf(utility_from_sums(3.0, float("inf")))
    with pytest.raises(ValueError, match=">= 0"):
        utility_from_sums(-1.0, 2.0)
    with pytest.raises(ValueError, match=">= 0"):
        utility_from_sums(1.0, -2.0)


def test_flux_engine_utilities_go_through_utility_from_sums():
    """The Flux method's backprop and zeroth-order utilities: sqrt(|D_e| * scale * sum ||g||^2)."""
    from types import SimpleNamespace as NS

    from flux.methods.flux import Flux, _ZerothOrderExplorer

    tokens = torch.tensor([[2, 0, 1], [0, 0, 3], [1, 1, 0], [4, 0, 0]])  # sample_tokens [N, E]
    profile = NS(indices=None, layers=[NS(sample_tokens=tokens, num_experts=3)])
    samples = [0, 1, 3]
    layers = [NS(view=NS(tuned_experts=[0, 2]))]
    tracker = NS(scale=2.5, sq_norms={0: torch.tensor([0.7, 1.3])})
    out = Flux._utilities(profile, samples, tracker, layers)
    # |D_0| = 2 (samples 0, 3), |D_2| = 2 (samples 0, 1)
    assert out == {(0, 0): float((2.0 * float(2.5 * torch.tensor(0.7))) ** 0.5),
                   (0, 2): float((2.0 * float(2.5 * torch.tensor(1.3))) ** 0.5)}
    explorer = _ZerothOrderExplorer.__new__(_ZerothOrderExplorer)
    explorer.rows, explorer.sq = [(0, 1)], {(0, 1): 4.0}
    assert explorer.utilities(profile, samples) == {(0, 1): 0.0}  # no trained sample reached expert 1
    explorer.rows = [(0, 0)]
    explorer.sq = {(0, 0): float("nan")}
    assert math.isnan(explorer.utilities(profile, samples)[(0, 0)])
    with pytest.raises(ValueError, match="layer 0"):
        activation_utilities([[float("nan"), 1.0]])


# ------------------------------------------------------------------------------------ epsilon


def test_epsilon_schedules():
    lin = EpsilonSchedule()  # default: linear 0.3 -> 0.9 over 10 rounds
    assert [lin(r) for r in (0, 5, 10, 20)] == pytest.approx([0.3, 0.6, 0.9, 0.9])
    cos = EpsilonSchedule(0.2, 1.0, 4, "cosine")
    assert [cos(r) for r in (0, 2, 4, 9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert cos(1) == pytest.approx(0.2 + 0.8 * (1 - math.cos(math.pi / 4)) / 2)
    assert EpsilonSchedule(0.7, kind="constant")(50) == 0.7
    for sched in (lin, cos):
        values = [sched(r) for r in range(15)]
        assert values == sorted(values)  # more exploitation later
    for bad in (dict(start=-0.1), dict(end=1.5), dict(rounds=0), dict(kind="exp")):
        with pytest.raises(ValueError):
            EpsilonSchedule(**bad)
    with pytest.raises(ValueError, match="round_idx"):
        lin(-1)


@pytest.mark.parametrize(
    "budget, eps, expected",
    [(10, 0.3, (3, 7)), (5, 0.3, (2, 3)), (1, 0.3, (0, 1)), (1, 0.5, (1, 0)), (4, 1.0, (4, 0)), (4, 0.0, (0, 4)), (0, 0.6, (0, 0)), (7, 0.9, (6, 1))],
)
def test_split_budget(budget, eps, expected):
    assert split_budget(budget, eps) == expected


# ------------------------------------------------------------------------------------ Eq. 4


UTILS = [torch.tensor([5.0, 1.0, 3.0, 0.0]), torch.tensor([4.0, 2.0, 6.0, 0.5])]


def test_select_top_b_hand_computed():
    assert [t.tolist() for t in select_top_b(UTILS, 3)] == [[0], [0, 2]]  # 6, 5, 4
    assert [t.tolist() for t in select_top_b(UTILS, 0)] == [[], []]
    assert [t.tolist() for t in select_top_b(UTILS, 8)] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # ties: shallower layer first, then lower id
    ties = [torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 1.0])]
    assert [t.tolist() for t in select_top_b(ties, 2)] == [[1, 2], []]
    assert [t.tolist() for t in select_top_b(torch.stack(UTILS), 2)] == [[0], [2]]


def test_assign_roles_respects_budgets_and_epsilon():
    gen = torch.Generator().manual_seed(0)
    num_layers, num_experts = 4, 8
    participants = [torch.rand(num_layers, num_experts, generator=gen) for _ in range(5)]
    budgets = [0, 1, 6, 13, 32]
    for round_idx in (0, 4, 10):
        eps = EpsilonSchedule()(round_idx)
        roles = assign_roles(participants, budgets, round_idx=round_idx, seed=round_idx)
        for util, budget, r in zip(participants, budgets, roles):
            n_exploit = math.floor(eps * budget + 0.5 + 1e-9)
            assert r.epsilon == pytest.approx(eps) and r.budget == budget
            assert r.num_tuning == budget
            assert r.num_exploration == budget - n_exploit
            top = select_top_b(util, n_exploit)
            assert [t.tolist() for t in r.exploitation] == [t.tolist() for t in top]
            for l in range(num_layers):
                tuning, explore = r.tuning[l], r.exploration[l]
                assert tuning.unique().numel() == tuning.numel()
                assert torch.isin(explore, tuning).all()
                assert (tuning.diff() > 0).all() if tuning.numel() > 1 else True
            masks = r.role_masks()
            assert sum(int((m == 1).sum()) for m in masks) == n_exploit
            assert sum(int((m == 2).sum()) for m in masks) == budget - n_exploit


def test_assign_roles_extremes_and_determinism():
    # epsilon 1 is Eq. 4's top-B; epsilon 0 is all exploration
    [r1] = assign_roles([UTILS], 3, epsilon=1.0)
    assert [t.tolist() for t in r1.tuning] == [[0], [0, 2]] and r1.num_exploration == 0
    [r0] = assign_roles([UTILS], 3, epsilon=0.0)
    assert r0.num_exploration == 3 and r0.num_tuning == 3
    a = assign_roles([UTILS] * 3, [2, 3, 4], epsilon=0.5, seed=11)
    b = assign_roles([UTILS] * 3, [2, 3, 4], epsilon=0.5, seed=11)
    assert all(torch.equal(x, y) for ra, rb in zip(a, b) for x, y in zip(ra.tuning, rb.tuning))
    draws = {tuple(tuple(t.tolist()) for t in assign_roles([UTILS], 4, epsilon=0.25, seed=s)[0].exploration) for s in range(20)}
    assert len(draws) > 1  # the seed matters
    # later rounds exploit more under the default schedule
    early = assign_roles([UTILS], 5, round_idx=0)[0]
    late = assign_roles([UTILS], 5, round_idx=10)[0]
    assert early.num_exploration > late.num_exploration


def test_exploration_is_uniform_over_the_rest():
    utils = [torch.tensor([9.0, 1.0, 2.0, 3.0, 4.0, 5.0])]
    counts = torch.zeros(6)
    gen = torch.Generator().manual_seed(0)
    trials = 1500
    for _ in range(trials):
        [r] = assign_roles([utils], 2, epsilon=0.5, generator=gen)
        assert r.exploitation[0].tolist() == [0]
        counts[r.exploration[0]] += 1
    assert counts[0] == 0
    # each of the 5 others drawn with probability 1/5: 300 +- 3 sigma (sigma ~ 15.5)
    assert ((counts[1:] - trials / 5).abs() < 50).all(), counts


def test_exploration_by_utility_draws_in_proportion_and_zero_utility_last():
    # two layers: the flat positions of (layer, expert) pairs must map to the right utilities
    utils = [torch.tensor([9.0, 0.0, 1.0]), torch.tensor([0.0, 3.0, 0.0])]
    counts = {(0, 1): 0, (0, 2): 0, (1, 0): 0, (1, 1): 0, (1, 2): 0}
    gen = torch.Generator().manual_seed(0)
    trials = 2000
    for _ in range(trials):
        [r] = assign_roles([utils], 2, epsilon=0.5, generator=gen, draw="utility")
        assert r.exploitation[0].tolist() == [0] and r.exploitation[1].tolist() == []
        [(l, e)] = [(l, int(e)) for l, x in enumerate(r.exploration) for e in x]
        counts[(l, e)] += 1
    # one exploration expert among utilities {1, 3} (the zeros are never drawn while a positive
    # one is left): P = 1/4 and 3/4, 500 / 1500 +- 3 sigma (sigma ~ 19.4)
    assert counts[(0, 1)] == counts[(1, 0)] == counts[(1, 2)] == 0
    assert abs(counts[(0, 2)] - trials / 4) < 60 and abs(counts[(1, 1)] - 3 * trials / 4) < 60, counts
    # more exploration experts than positive utilities: the zero-utility ones fill the rest
    [r] = assign_roles([utils], 5, epsilon=0.2, generator=gen, draw="utility")
    assert r.num_tuning == 5 and r.num_exploration == 4
    # all zero: uniform among the rest, still B distinct experts
    [r] = assign_roles([[torch.zeros(6)]], 3, epsilon=0.0, generator=gen, draw="utility")
    assert len(set(r.tuning[0].tolist())) == 3
    with pytest.raises(ValueError, match="draw must be one of"):
        assign_roles([utils], 2, epsilon=0.5, draw="greedy")


def test_the_config_knows_the_same_exploration_draws():
    from flux.federation.config import EXPLORATION_DRAWS as CONFIG_DRAWS
    from flux.roles.assignment import EXPLORATION_DRAWS

    assert CONFIG_DRAWS == EXPLORATION_DRAWS


@pytest.mark.parametrize(
    "budgets, message",
    [
        ([-1], "must be >= 0"),
        ([9], "exceeds the 8 experts"),
        ([2, 2], "2 budgets for 1 participants"),
        ([2.5], "must be an int"),
        ([True], "must be an int"),
    ],
)
def test_assign_roles_bad_budgets(budgets, message):
    with pytest.raises(ValueError, match=message):
        assign_roles([UTILS], budgets)


def test_assign_roles_other_errors():
    with pytest.raises(ValueError, match="exceeds"):
        select_top_b(UTILS, 100)
    with pytest.raises(ValueError, match="finite and >= 0"):
        assign_roles([[torch.tensor([1.0, float("nan")])]], 1)
    with pytest.raises(ValueError, match="finite and >= 0"):
        assign_roles([[torch.tensor([1.0, -2.0])]], 1)
    with pytest.raises(ValueError, match="epsilon"):
        assign_roles([UTILS], 1, epsilon=1.2)


# ------------------------------------------------------------------------------------ SPSA


A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, -0.3], [0.0, -0.3, 1.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def _quadratic(params):
    w = params[0]
    return 0.5 * w @ A @ w + B @ w


@pytest.mark.parametrize("antithetic", [False, True])
def test_spsa_expectation_on_quadratic(antithetic):
    w = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
    true = A @ w + B  # [2.0, -0.05, -0.8]
    gen = torch.Generator().manual_seed(0)
    n = 10000
    [est] = spsa_gradient(_quadratic, [w], sigma=0.1, num_perturbations=n, antithetic=antithetic, generator=gen)
    # unbiased for a quadratic; per-coordinate std <= sqrt(2) |g| / sqrt(n) ~ 0.03
    assert (est - true).abs().max() < 0.1, (est, true)
    assert cosine_distance(est, true) < 0.01


def test_spsa_single_perturbation_matches_formula():
    w = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
    sigma = 0.05
    [est] = spsa_gradient(_quadratic, [w], sigma=sigma, num_perturbations=1, generator=torch.Generator().manual_seed(3))
    xi = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * sigma
    expected = (_quadratic([w + xi]) - _quadratic([w])) / sigma**2 * xi
    torch.testing.assert_close(est, expected)
    [two] = spsa_gradient(_quadratic, [w], sigma=sigma, num_perturbations=1, antithetic=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(two, (_quadratic([w + xi]) - _quadratic([w - xi])) / (2 * sigma**2) * xi)


def test_spsa_containers_shapes_and_dtypes():
    params = {"a": torch.randn(2, 3), "b": torch.randn(4, dtype=torch.bfloat16)}
    before = {k: v.clone() for k, v in params.items()}

    def loss(p):
        return (p["a"] ** 2).sum() + p["b"].float().sum()

    est = spsa_gradient(loss, params, num_perturbations=2, generator=torch.Generator().manual_seed(0), base_loss=loss(params))
    assert set(est) == {"a", "b"}
    assert est["a"].shape == (2, 3) and est["a"].dtype == torch.float32
    assert est["b"].shape == (4,) and est["b"].dtype == torch.bfloat16
    assert all(torch.equal(params[k], before[k]) for k in params)
    lst = spsa_gradient(lambda p: (p[0] ** 2).sum(), [torch.randn(5)], num_perturbations=1)
    assert isinstance(lst, list) and lst[0].shape == (5,)
    with pytest.raises(ValueError, match="sigma"):
        spsa_gradient(loss, params, sigma=0.0)
    with pytest.raises(ValueError, match="num_perturbations"):
        spsa_gradient(loss, params, num_perturbations=0)


def test_cosine_distance():
    a = torch.tensor([1.0, 0.0])
    assert cosine_distance(a, a) == pytest.approx(0.0)
    assert cosine_distance(a, -a) == pytest.approx(2.0)
    assert cosine_distance(a, torch.tensor([0.0, 3.0])) == pytest.approx(1.0)
    assert cosine_distance(a, torch.zeros(2)) == 1.0
    # lists / dicts are concatenated: (1, 0 | 1) vs (1, 0 | -1) -> cos = 0
    assert cosine_distance([a, torch.ones(1)], [a, -torch.ones(1)]) == pytest.approx(1.0)
    assert cosine_distance({"x": a, "y": torch.ones(1)}, {"y": torch.ones(1), "x": a}) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="size"):
        cosine_distance(a, torch.ones(3))
