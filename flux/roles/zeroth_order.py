"""Forward-only (zeroth-order, SPSA-style) gradient estimates for exploration experts.

One-sided (the paper's form), xi_j ~ N(0, sigma^2 I):

    g_hat = 1/n sum_j (L(W + xi_j) - L(W)) / sigma^2 * xi_j

Two-sided (antithetic) variant: (L(W + xi_j) - L(W - xi_j)) / (2 sigma^2) * xi_j.  Both are
unbiased for a quadratic loss (E[xi xi^T] = sigma^2 I; the odd third moment cancels the curvature
term); in general the bias is O(sigma^2) for the two-sided and O(sigma) for the one-sided form.
Cost: n + 1 forward passes (one-sided; n if the caller passes the unperturbed loss) or 2n.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

DEFAULT_SIGMA = 1e-3
DEFAULT_NUM_PERTURBATIONS = 8

Params = Union[Sequence[Tensor], Mapping[str, Tensor]]


def _as_items(params: Params) -> tuple[list[str] | None, list[Tensor]]:
    if isinstance(params, Mapping):
        return list(params.keys()), list(params.values())
    return None, list(params)


def _pack(names: list[str] | None, tensors: list[Tensor]):
    return tensors if names is None else dict(zip(names, tensors))


def spsa_gradient(
    loss_fn: Callable[[Params], Tensor | float],
    params: Params,
    *,
    sigma: float = DEFAULT_SIGMA,
    num_perturbations: int = DEFAULT_NUM_PERTURBATIONS,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    base_loss: Tensor | float | None = None,
) -> list[Tensor] | dict[str, Tensor]:
    """SPSA gradient estimate of ``loss_fn`` at ``params``, forward passes only.

    Args:
        loss_fn: called with perturbed copies of ``params`` (same container type: list or
            dict), returns a scalar loss (tensor or float).  Evaluated under ``torch.no_grad``.
        params: float tensors (list or name -> tensor), any shapes; not modified.
        sigma: standard deviation of the Gaussian perturbation (> 0).
        num_perturbations: n >= 1 perturbations averaged.
        antithetic: use the two-sided estimate (2n forward passes, lower bias and variance).
        generator: torch.Generator for the perturbations (CPU; reproducible); default global RNG.
        base_loss: L(W) if already known (one-sided only), saves one forward pass.

    Returns:
        The estimate, same container type and shapes as ``params``, in each parameter's dtype
        (accumulated in float32, float64 for float64 parameters).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not isinstance(num_perturbations, int) or num_perturbations < 1:
        raise ValueError(f"num_perturbations must be an int >= 1, got {num_perturbations!r}")
    names, tensors = _as_items(params)
    if not tensors:
        raise ValueError("params must hold at least one tensor")
    base = [t.detach() for t in tensors]
    acc_dtypes = [torch.float64 if t.dtype == torch.float64 else torch.float32 for t in base]
    estimate = [torch.zeros(t.shape, dtype=d, device=t.device) for t, d in zip(base, acc_dtypes)]

    def loss_at(ts: list[Tensor]) -> float:
        return float(loss_fn(_pack(names, ts)))

    with torch.no_grad():
        if not antithetic:
            l0 = loss_at(base) if base_loss is None else float(base_loss)
        for _ in range(num_perturbations):
            # Drawn on CPU with the generator (device generators are not portable), then moved.
            xi = [
                (torch.randn(t.shape, dtype=d, generator=generator) * sigma).to(t.device)
                for t, d in zip(base, acc_dtypes)
            ]
            plus = loss_at([(t.to(d) + x).to(t.dtype) for t, d, x in zip(base, acc_dtypes, xi)])
            if antithetic:
                minus = loss_at([(t.to(d) - x).to(t.dtype) for t, d, x in zip(base, acc_dtypes, xi)])
                coef = (plus - minus) / (2.0 * sigma * sigma)
            else:
                coef = (plus - l0) / (sigma * sigma)
            for est, x in zip(estimate, xi):
                est.add_(x, alpha=coef / num_perturbations)
    return _pack(names, [est.to(t.dtype) for est, t in zip(estimate, base)])


def cosine_distance(a: Tensor | Params, b: Tensor | Params) -> float:
    """1 - cos(a, b) of two gradients, each one tensor or a list/dict of tensors (flattened and
    concatenated in order; dicts by key order of ``a``).  Returns 1.0 if either is all zero.
    """
    def flat(x, keys=None) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().double().reshape(-1).cpu()
        if isinstance(x, Mapping):
            x = [x[k] for k in (keys if keys is not None else x.keys())]
        return torch.cat([t.detach().double().reshape(-1).cpu() for t in x])

    keys = list(a.keys()) if isinstance(a, Mapping) else None
    va, vb = flat(a), flat(b, keys if isinstance(b, Mapping) else None)
    if va.shape != vb.shape:
        raise ValueError(f"gradients differ in size: {va.numel()} vs {vb.numel()}")
    na, nb = va.norm(), vb.norm()
    if na == 0 or nb == 0:
        return 1.0
    return float(1.0 - (va @ vb) / (na * nb))
