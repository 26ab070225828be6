"""Expert utility (FLUX Eq. 3, Oort-style statistical utility).

    u_e = |D_e| * sqrt( 1/|D_e| * sum_{k in D_e} ||g_k||^2 ) = sqrt( |D_e| * sum_k ||g_k||^2 )

with D_e the local samples routed to expert e and g_k the per-sample gradient of e's parameters.
Experts that see many samples with large gradients are worth tuning.  In round 1 there are no
gradients yet, so utility = activation frequency normalised per layer.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

SampleLoss = Callable[..., Tensor]


def utility_from_sums(num_routed: float, grad_sq_sum: float) -> float:
    """Eq. 3 from its two sums, the one implementation every caller uses:
    ``u_e = sqrt(|D_e| * sum_{k in D_e} ||g_k||^2)`` (``= |D_e| sqrt(mean ||g_k||^2)``).

    Args:
        num_routed: |D_e|, samples routed to the expert (may be a scaled estimate), >= 0.
        grad_sq_sum: sum over those samples of squared per-sample gradient norms, >= 0.

    A non-finite sum (a participant whose training diverged) gives a non-finite utility instead
    of raising: the server's update validation then rejects that participant's update, and the
    run goes on (the engine's behaviour before this function existed).  Negative sums raise.
    """
    if num_routed < 0 or grad_sq_sum < 0:  # False for NaN: it propagates
        raise ValueError(f"Eq. 3 needs sums >= 0, got |D_e|={num_routed}, sum ||g||^2={grad_sq_sum}")
    return float((num_routed * grad_sq_sum) ** 0.5)


def expert_utility(grad_sq_norms: Tensor | Sequence[float]) -> float:
    """Eq. 3 for one expert.

    Args:
        grad_sq_norms: float [|D_e|], squared per-sample gradient norms ||g_k||^2 of the samples
            routed to the expert (empty -> utility 0).
    """
    g = torch.as_tensor(grad_sq_norms, dtype=torch.float64).reshape(-1)
    if not torch.isfinite(g).all() or (g < 0).any():
        raise ValueError("squared gradient norms must be finite and >= 0")
    return utility_from_sums(float(g.numel()), float(g.sum()))


def utilities_from_grad_norms(sq_norms: Tensor, routed: Tensor | None = None) -> Tensor:
    """Eq. 3 for all experts of a layer at once.

    Args:
        sq_norms: float [N, E]; ``sq_norms[k, e] = ||g_k||^2`` for expert e's parameters.
        routed: bool [N, E]; sample k is in D_e (default: ``sq_norms > 0``, i.e. the sample
            reached the expert; pass the profile's routing to count routed zero-gradient samples).

    Returns:
        float64 [E].
    """
    if sq_norms.dim() != 2:
        raise ValueError(f"sq_norms must be [N, E], got shape {tuple(sq_norms.shape)}")
    s = sq_norms.detach().double().cpu()
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("squared gradient norms must be finite and >= 0")
    r = (s > 0) if routed is None else routed.detach().cpu().bool()
    if r.shape != s.shape:
        raise ValueError(f"routed must have shape {tuple(s.shape)}, got {tuple(r.shape)}")
    count = r.sum(0).double()
    total = torch.where(r, s, 0.0).sum(0)
    return torch.tensor([utility_from_sums(float(c), float(t)) for c, t in zip(count, total)], dtype=torch.float64)


def per_sample_grad_sq_norms(
    loss_fn: SampleLoss,
    params: Mapping[str, Tensor],
    samples: Tensor | Sequence[Tensor],
    *,
    expert_dim: int | None = None,
    method: str = "vmap",
    chunk_size: int | None = None,
) -> Tensor:
    """Squared per-sample gradient norms of ``params``.

    Args:
        loss_fn: ``loss_fn(params, *sample) -> scalar`` for ONE sample (no batch dim); must be
            functional in ``params`` (use ``torch.func.functional_call`` for modules) and, for
            ``method="vmap"``, free of data-dependent control flow.
        params: name -> float tensor; gradients are taken w.r.t. all of them.
        samples: tensor(s) with a leading sample dim N; sample k is ``[s[k] for s in samples]``.
        expert_dim: if given, every parameter is a stack over experts along this dim (e.g. 0 for
            ``gate_up_proj`` [E, 2I, H]) and the norms are returned per expert.
        method: "vmap" (``torch.func.vmap(torch.func.grad(...))``) or "loop" (autograd per
            sample; slower, works for any loss).
        chunk_size: vmap chunk size (bounds memory: chunk_size copies of the gradients).

    Returns:
        float32/64 [N] (sum over all parameters), or [N, E] with ``expert_dim``.
    """
    if isinstance(samples, Tensor):
        samples = (samples,)
    samples = tuple(samples)
    if not samples:
        raise ValueError("samples must hold at least one tensor")
    n = samples[0].shape[0]
    if any(s.shape[0] != n for s in samples):
        raise ValueError(f"all sample tensors need the same leading size, got {[s.shape[0] for s in samples]}")
    if method not in ("vmap", "loop"):
        raise ValueError(f'method must be "vmap" or "loop", got {method!r}')
    detached = {k: v.detach() for k, v in params.items()}

    def reduce(grads: Mapping[str, Tensor], batched: bool) -> Tensor:
        out = None
        for g in grads.values():
            sq = g * g
            if expert_dim is None:
                sq = sq.reshape(sq.shape[0], -1).sum(1) if batched else sq.sum()
            else:
                dim = expert_dim + (1 if batched else 0)
                keep = sq.movedim(dim, 1 if batched else 0)
                sq = keep.reshape(*keep.shape[: 2 if batched else 1], -1).sum(-1)
            out = sq if out is None else out + sq
        return out

    if n == 0:
        num_e = next(iter(params.values())).shape[expert_dim] if expert_dim is not None else None
        return torch.zeros(0) if num_e is None else torch.zeros(0, num_e)
    if method == "vmap":
        grad_fn = torch.func.grad(loss_fn)
        in_dims = (None,) + (0,) * len(samples)
        grads = torch.func.vmap(grad_fn, in_dims=in_dims, chunk_size=chunk_size)(detached, *samples)
        return reduce(grads, batched=True).detach()
    rows = []
    for k in range(n):
        leaf = {name: p.clone().requires_grad_(True) for name, p in detached.items()}
        loss = loss_fn(leaf, *[s[k] for s in samples])
        grads = torch.autograd.grad(loss, list(leaf.values()), allow_unused=True)
        grads = {name: torch.zeros_like(leaf[name]) if g is None else g for name, g in zip(leaf, grads)}
        rows.append(reduce(grads, batched=False).detach())
    return torch.stack(rows)


def activation_utilities(freqs_per_layer: Sequence[Tensor | Sequence[float]] | Tensor) -> list[Tensor]:
    """Round-1 utility: activation frequency normalised to sum 1 within each layer.

    Per-layer normalisation makes layers comparable in the budgeted top-B choice even when their
    raw frequency totals differ (top-k routing, dropped or padded tokens).

    Args:
        freqs_per_layer: L float tensors [E_l] (or a [L, E] tensor) of frequencies or counts.

    Returns:
        L float64 tensors [E_l]; all zeros for a layer that saw no tokens.
    """
    out = []
    for l, f in enumerate(freqs_per_layer):
        if isinstance(f, Tensor):
            t = f.detach().cpu().double().reshape(-1)
        else:
            t = torch.as_tensor(f, dtype=torch.float64).reshape(-1)
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError(f"layer {l}: activation frequencies must be finite and >= 0")
        total = t.sum()
        out.append(t / total if total > 0 else torch.zeros_like(t))
    return out
