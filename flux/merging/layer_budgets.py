"""Layer budgets for merged (non-tuning) experts: FLUX Eq. 1.

    b_l = (L - l + 1) / v_l          (l = 1 is the shallowest layer, v_l the variance of layer l's
                                      expert activation frequencies)
    B_non(l) = floor(b_l / sum_k b_k * B_non)

Shallow layers keep more merged experts (their merge error passes through more layers) and flat
layers keep more (no few experts dominate, so merging any of them hurts).  The paper leaves the
floor remainder and the bounds open; here:

* Layers without non-tuning experts get 0 and take no part in the sum.
* Every layer with non-tuning experts gets at least 1 group and at most its non-tuning count.
  The continuous shares are clamped to ``[1, n_l]`` and what the clamps free (or take) is
  redistributed over the unclamped layers in proportion to b_l (water-filling).  Without active
  clamps this is exactly Eq. 1's ``b_l / sum b * B_non``.
* The floor remainder goes one group at a time to the layers with the largest fractional part
  (largest-remainder method); ties go to the shallower layer.
* A zero variance (perfectly flat layer) is replaced by ``var_floor`` so b_l stays finite but
  very large: a flat layer gets as many groups as the bounds allow, which is Eq. 1's limit.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch
from torch import Tensor

LayerStats = Union[Tensor, Sequence[float], Sequence[Tensor], Sequence[Sequence[float]]]

#: Replaces a zero (or tiny) activation-frequency variance.  Frequencies are shares in [0, 1], so
#: real variances are >= ~1e-8 unless the layer is exactly flat; 1e-12 keeps b_l finite.
DEFAULT_VAR_FLOOR = 1e-12


def frequency_variance(freqs: Tensor | Sequence[float]) -> float:
    """Population variance (``unbiased=False``) of one layer's expert activation frequencies.

    Args:
        freqs: float tensor [E] (any float dtype), or a list of floats; E >= 1.
    """
    f = torch.as_tensor(freqs, dtype=torch.float64).reshape(-1)
    if f.numel() == 0:
        raise ValueError("a layer needs at least one expert frequency to compute its variance")
    if not torch.isfinite(f).all():
        raise ValueError(f"activation frequencies must be finite, got {f.tolist()}")
    return float(f.var(unbiased=False))


def _as_variances(stats: LayerStats) -> list[float]:
    """Accept variances [L] or per-layer frequencies ([L, E] tensor or a list of [E_l])."""
    if isinstance(stats, Tensor):
        if stats.dim() == 1:
            return [float(v) for v in stats.double()]
        if stats.dim() == 2:
            return [frequency_variance(row) for row in stats]
        raise ValueError(f"stats must be variances [L] or frequencies [L, E], got shape {tuple(stats.shape)}")
    items = list(stats)
    if all(isinstance(x, numbers.Real) or (isinstance(x, Tensor) and x.dim() == 0) for x in items):
        return [float(x) for x in items]
    return [frequency_variance(x) for x in items]


def layer_budgets(
    stats: LayerStats,
    num_non_tuning: Sequence[int],
    total_budget: int,
    *,
    var_floor: float = DEFAULT_VAR_FLOOR,
) -> list[int]:
    """Number of merged-expert groups per layer (Eq. 1 with bounds and remainder handling).

    Args:
        stats: either the per-layer variances of activation frequencies (float tensor [L] or a
            list of L floats) or the frequencies themselves (float tensor [L, E], or a list of L
            1-D tensors / lists, lengths may differ); the variance is then taken over all experts
            of the layer (``unbiased=False``).  Layer 0 is the shallowest.
        num_non_tuning: non-tuning expert count n_l of each layer (L ints >= 0).
        total_budget: B_non, the number of merged groups over all layers.

    Returns:
        L ints ``B_l`` with ``sum == total_budget``, ``1 <= B_l <= n_l`` where ``n_l > 0`` and
        ``B_l == 0`` where ``n_l == 0``.

    Raises:
        ValueError: negative or non-integer budget, a budget larger than the non-tuning experts
            (``sum n_l``) or smaller than the number of layers with non-tuning experts, negative
            variances, or mismatched lengths.
    """
    variances = _as_variances(stats)
    counts = [int(n) for n in num_non_tuning]
    num_layers = len(variances)
    if len(counts) != num_layers:
        raise ValueError(f"got {num_layers} layer statistics but {len(counts)} non-tuning counts")
    if any(n != m for n, m in zip(counts, num_non_tuning)) or any(n < 0 for n in counts):
        raise ValueError(f"non-tuning counts must be ints >= 0, got {list(num_non_tuning)}")
    if isinstance(total_budget, bool) or not isinstance(total_budget, numbers.Integral):
        raise ValueError(f"total_budget must be an int, got {total_budget!r}")
    total_budget = int(total_budget)
    if total_budget < 0:
        raise ValueError(f"total_budget must be >= 0, got {total_budget}")
    if any(not math.isfinite(v) or v < 0 for v in variances):
        raise ValueError(f"variances must be finite and >= 0, got {variances}")
    if not var_floor > 0:
        raise ValueError(f"var_floor must be > 0, got {var_floor}")
    capacity = sum(counts)
    active = [i for i, n in enumerate(counts) if n > 0]
    if total_budget > capacity:
        raise ValueError(
            f"total_budget={total_budget} exceeds the {capacity} non-tuning experts: a layer never "
            f"gets more groups than non-tuning experts (counts per layer: {counts})"
        )
    if total_budget < len(active):
        raise ValueError(
            f"total_budget={total_budget} is smaller than the {len(active)} layers with non-tuning "
            f"experts: every such layer needs at least one merged group"
        )
    budgets = [0] * num_layers
    if not active:
        return budgets

    # Eq. 1 weights; l is 1-based in the paper, so depth weight L - l + 1 == num_layers - index.
    b = {i: (num_layers - i) / max(variances[i], var_floor) for i in active}
    quota = _water_fill(b, {i: counts[i] for i in active}, total_budget)

    # Floor with a tolerance (shares are computed in float64; 2.9999999999 means 3).
    for i in active:
        budgets[i] = min(counts[i], max(1, int(math.floor(quota[i] + 1e-9))))
    remainder = total_budget - sum(budgets)
    # Largest remainder first, then larger b (shallower/flatter), then shallower index.
    order = sorted(active, key=lambda i: (-(quota[i] - budgets[i]), -b[i], i))
    while remainder > 0:  # float slack could leave more than one unit per layer; loop until done
        progressed = False
        for i in order:
            if remainder == 0:
                break
            if budgets[i] < counts[i]:
                budgets[i] += 1
                remainder -= 1
                progressed = True
        assert progressed, "unreachable: total_budget <= capacity was checked"
    while remainder < 0:  # only possible through float slack; take from the smallest remainders
        for i in reversed(order):
            if remainder == 0:
                break
            if budgets[i] > 1:
                budgets[i] -= 1
                remainder += 1
    return budgets


def _water_fill(b: dict[int, float], cap: dict[int, int], total: int) -> dict[int, float]:
    """Continuous shares q_i = clamp(c * b_i, 1, cap_i) with sum q == total.

    g(c) = sum clamp(c b_i, 1, cap_i) is piecewise linear and non-decreasing in c with breakpoints
    1/b_i and cap_i/b_i; find the segment containing ``total`` and solve it exactly.
    """
    def g(c: float) -> float:
        return sum(min(cap[i], max(1.0, c * b[i])) for i in b)

    points = sorted({1.0 / b[i] for i in b} | {cap[i] / b[i] for i in b})
    lo = 0.0
    for hi in points:
        if g(hi) >= total:
            break
        lo = hi
    else:  # total == sum(cap): everything saturates
        return {i: float(cap[i]) for i in b}
    mid = (lo + hi) / 2
    fixed, free_b = 0.0, 0.0
    for i in b:
        x = mid * b[i]
        if x <= 1.0:
            fixed += 1.0
        elif x >= cap[i]:
            fixed += cap[i]
        else:
            free_b += b[i]
    c = hi if free_b == 0.0 else (total - fixed) / free_b
    return {i: min(float(cap[i]), max(1.0, c * b[i])) for i in b}
