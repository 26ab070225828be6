"""Dynamic expert role assignment (FLUX Eq. 4 and the exploitation/exploration split).

Eq. 4 maximises sum_e x_ie u_ie subject to sum_e x_ie <= B_tune(i), x in {0, 1}.  It separates
per participant and, utilities being >= 0, is solved by the B_tune(i) highest-utility experts
(:func:`select_top_b`).  FLUX does not take all of them: a share epsilon of the budget goes to
the highest-utility experts (exploitation), the rest of the budget is drawn uniformly at random
among all other experts (exploration), so experts whose utility is stale or never measured get
tuned and re-measured.  Epsilon is the EXPLOITATION share and grows over rounds.

Epsilon schedule (the paper gives no formula; fixed 0.3 was unstable and fixed 0.7 slow): by
default a linear ramp from 0.3 to 0.9 over 10 rounds, then constant.
* Start 0.3: round-1 utilities are only activation frequencies and most experts have no
  gradient-based utility yet, so early rounds mostly measure (explore); the model is far from the
  target then, so the instability of heavy exploration costs little.
* End 0.9, not 1.0: later rounds mostly exploit for stable convergence, while 10% exploration
  keeps tracking the routing drift that fine-tuning causes (the reason profiling repeats).
* Linear: the simplest monotone ramp, one knob (its length); it passes the paper's "slow but
  stable" 0.7 two thirds of the way.  "cosine" (flat at both ends) and "constant" are options.
The split rounds to nearest: n_exploit = round_half_up(epsilon * B).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine", "constant")

# how exploration experts are drawn from the non-exploitation experts: "uniform" (every expert
# equally likely: the paper's random exploration) or "utility" (without replacement, with
# probability proportional to the current utility estimate, so an expert that gets none of the
# participant's tokens, and would receive no gradient, is drawn last)
EXPLORATION_DRAWS = ("uniform", "utility")

Utilities = Union[Tensor, Sequence[Tensor], Sequence[Sequence[float]]]

ROLE_NON_TUNING, ROLE_EXPLOIT, ROLE_EXPLORE = 0, 1, 2


@dataclass(frozen=True)
class EpsilonSchedule:
    """Exploitation share epsilon(r) for round r = 0, 1, ...

    Attributes:
        start: epsilon at round 0, in [0, 1].
        end: epsilon from round ``rounds`` on, in [0, 1].
        rounds: ramp length in rounds (>= 1).
        kind: "linear", "cosine" (half-cosine ramp) or "constant" (always ``start``).
    """

    start: float = 0.3
    end: float = 0.9
    rounds: int = 10
    kind: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"kind must be one of {SCHEDULES}, got {self.kind!r}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"epsilon {name} must be in [0, 1], got {v!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")

    def __call__(self, round_idx: int) -> float:
        if not isinstance(round_idx, int) or round_idx < 0:
            raise ValueError(f"round_idx must be an int >= 0, got {round_idx!r}")
        if self.kind == "constant":
            return float(self.start)
        t = min(round_idx / self.rounds, 1.0)
        if self.kind == "cosine":
            t = (1.0 - math.cos(math.pi * t)) / 2.0
        return float(self.start + (self.end - self.start) * t)


def split_budget(budget: int, epsilon: float) -> tuple[int, int]:
    """(n_exploit, n_explore) with n_exploit = round_half_up(epsilon * budget)."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    # the 1e-9 absorbs float error (0.3 * 5 = 1.4999999999999998 must round to 2)
    n_exploit = min(budget, int(math.floor(epsilon * budget + 0.5 + 1e-9)))
    return n_exploit, budget - n_exploit


@dataclass
class RoleAssignment:
    """Roles of one participant for one round.

    Attributes:
        budget: B_tune of the participant.
        epsilon: exploitation share used.
        tuning: per layer, int64 [T_l] ascending ids of the tuning experts.
        exploration: per layer, int64 ascending ids, the exploration subset of ``tuning``.
        num_experts: per layer, E_l.
    """

    budget: int
    epsilon: float
    tuning: list[Tensor]
    exploration: list[Tensor]
    num_experts: list[int]

    @property
    def exploitation(self) -> list[Tensor]:
        return [t[~torch.isin(t, x)] for t, x in zip(self.tuning, self.exploration)]

    @property
    def num_tuning(self) -> int:
        return sum(int(t.numel()) for t in self.tuning)

    @property
    def num_exploration(self) -> int:
        return sum(int(t.numel()) for t in self.exploration)

    def role_masks(self) -> list[Tensor]:
        """Per layer int8 [E_l]: 0 non-tuning, 1 exploitation, 2 exploration."""
        out = []
        for t, x, e in zip(self.tuning, self.exploration, self.num_experts):
            r = torch.zeros(e, dtype=torch.int8)
            r[t] = ROLE_EXPLOIT
            r[x] = ROLE_EXPLORE
            out.append(r)
        return out


def _layers(utilities: Utilities, who: str) -> list[Tensor]:
    rows = list(utilities) if not isinstance(utilities, Tensor) else list(utilities.unbind(0))
    out = []
    for l, u in enumerate(rows):
        if isinstance(u, Tensor):
            t = u.detach().cpu().double().reshape(-1)
        else:
            t = torch.as_tensor(u, dtype=torch.float64).reshape(-1)
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError(f"{who}, layer {l}: utilities must be finite and >= 0")
        out.append(t)
    return out


def _check_budget(budget: int, total: int, who: str) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise ValueError(f"{who}: tuning budget must be an int, got {budget!r}")
    budget = int(budget)
    if budget < 0:
        raise ValueError(f"{who}: tuning budget must be >= 0, got {budget}")
    if budget > total:
        raise ValueError(f"{who}: tuning budget {budget} exceeds the {total} experts of the model")
    return budget


def _ranked(utils: list[Tensor]) -> tuple[Tensor, Tensor]:
    """All (layer, expert) pairs by descending utility; ties -> lower layer, then lower expert."""
    if not utils:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    flat = torch.cat(utils)
    layer = torch.cat([torch.full((u.numel(),), l, dtype=torch.long) for l, u in enumerate(utils)])
    expert = torch.cat([torch.arange(u.numel()) for u in utils])
    order = torch.sort(flat, descending=True, stable=True).indices
    return layer[order], expert[order]


def _per_layer(layer: Tensor, expert: Tensor, num_layers: int) -> list[Tensor]:
    return [expert[layer == l].sort().values for l in range(num_layers)]


def _flat_index(layer: Tensor, expert: Tensor, utils: list[Tensor]) -> Tensor:
    """Positions of (layer, expert) pairs in ``torch.cat(utils)``."""
    offsets = torch.tensor([0] + [u.numel() for u in utils[:-1]], dtype=torch.long).cumsum(0)
    return offsets[layer] + expert


def _draw_by_weight(weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` distinct positions of ``weights`` (float64 [N], >= 0), without replacement with
    probability proportional to weight; once the positive weights are used up, the rest uniformly."""
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    positive = torch.nonzero(weights > 0).flatten()
    k = min(n, positive.numel())
    first = (positive[torch.multinomial(weights[positive], k, replacement=False, generator=generator)]
             if k else torch.zeros(0, dtype=torch.long))
    if k == n:
        return first
    zero = torch.nonzero(weights <= 0).flatten()
    return torch.cat([first, zero[torch.randperm(zero.numel(), generator=generator)[:n - k]]])


def select_top_b(utilities: Utilities, budget: int) -> list[Tensor]:
    """Eq. 4 for one participant: the ``budget`` highest-utility experts over all layers.

    Args:
        utilities: per layer float [E_l] (>= 0), or a [L, E] tensor.
        budget: B_tune, 0 <= budget <= sum E_l.

    Returns:
        Per layer int64 ascending expert ids.  Ties go to the shallower layer, then lower id.
    """
    utils = _layers(utilities, "participant")
    budget = _check_budget(budget, sum(u.numel() for u in utils), "participant")
    layer, expert = _ranked(utils)
    return _per_layer(layer[:budget], expert[:budget], len(utils))


def assign_roles(
    utilities: Sequence[Utilities] | Tensor,
    budgets: int | Sequence[int],
    *,
    round_idx: int = 0,
    epsilon: float | None = None,
    schedule: EpsilonSchedule | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    draw: str = "uniform",
) -> list[RoleAssignment]:
    """Roles for every participant of a round.

    Args:
        utilities: per participant, its per-layer utilities (list of float [E_l], or [L, E]);
            or one float tensor [P, L, E].
        budgets: B_tune per participant (list of ints, may differ) or one int for all.
        round_idx: round number r >= 0 (0-based), fed to the schedule.
        epsilon: fixed exploitation share in [0, 1] (overrides the schedule).
        schedule: epsilon schedule (default :class:`EpsilonSchedule`()).
        seed: seed of the exploration draws when no ``generator`` is given.
        generator: CPU torch.Generator for the exploration draws (participants drawn in order).
        draw: "uniform" or "utility" (:data:`EXPLORATION_DRAWS`): how the exploration experts
            are drawn from the remaining ones.

    Returns:
        One :class:`RoleAssignment` per participant: ``round_half_up(epsilon * B)`` exploitation
        experts (highest utility; ties to the shallower layer, then the lower id) and the rest of
        B drawn without replacement from all remaining experts, uniformly or by utility.

    Raises:
        ValueError: a negative or non-int budget, a budget above the participant's expert count,
            a budget list of the wrong length, negative or non-finite utilities, epsilon out of
            [0, 1], an unknown ``draw``.
    """
    if draw not in EXPLORATION_DRAWS:
        raise ValueError(f"draw must be one of {EXPLORATION_DRAWS}, got {draw!r}")
    per_participant = list(utilities.unbind(0)) if isinstance(utilities, Tensor) else list(utilities)
    num_p = len(per_participant)
    if isinstance(budgets, numbers.Integral) and not isinstance(budgets, bool):
        budget_list = [budgets] * num_p
    else:
        budget_list = list(budgets)
        if len(budget_list) != num_p:
            raise ValueError(f"got {len(budget_list)} budgets for {num_p} participants")
    if epsilon is None:
        epsilon = (schedule or EpsilonSchedule())(round_idx)
    elif not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))

    out = []
    for i, (utils_i, budget) in enumerate(zip(per_participant, budget_list)):
        who = f"participant {i}"
        utils = _layers(utils_i, who)
        total = sum(u.numel() for u in utils)
        budget = _check_budget(budget, total, who)
        n_exploit, n_explore = split_budget(budget, epsilon)
        layer, expert = _ranked(utils)
        rest = torch.arange(n_exploit, total)
        if draw == "uniform":
            drawn = rest[torch.randperm(rest.numel(), generator=gen)[:n_explore]]
        else:
            drawn = rest[_draw_by_weight(torch.cat(utils)[_flat_index(layer, expert, utils)][rest], n_explore, gen)]
        chosen = torch.cat([torch.arange(n_exploit), drawn])
        tuning = _per_layer(layer[chosen], expert[chosen], len(utils))
        exploration = _per_layer(layer[drawn], expert[drawn], len(utils))
        out.append(RoleAssignment(budget, float(epsilon), tuning, exploration, [u.numel() for u in utils]))
    return out
