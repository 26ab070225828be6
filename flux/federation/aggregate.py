"""Expert-wise aggregation of participant updates (FedAvg per expert).

Each expert's new delta is the average of the deltas the participants that tuned it sent,
weighted by the tokens each routed to it; experts nobody tuned are absent from the result and so
keep their weights.  Dense (non-expert) deltas are averaged weighted by sample counts.

Determinism: sums run in float64 in ascending participant order, so the result depends only on
the *set* of updates, not on their order or on how they were split across ranks (W = 1 and
W = 2 give bit-identical weights).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from flux.federation.update import ExpertKey, Update

__all__ = ["ExpertKey", "Update", "aggregate", "apply_expert_deltas", "broadcast_object", "gather_updates",
           "validate_update"]


# ---------------------------------------------------------------------------- validation
def _is_count(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int) and x >= 0


def _tensor_problem(t: Any, expected: torch.Size, what: str) -> Optional[str]:
    if not isinstance(t, Tensor):
        return f"{what} is a {type(t).__name__}, not a tensor"
    if not t.is_floating_point():
        return f"{what} has dtype {t.dtype}, expected a floating-point dtype"
    if tuple(t.shape) != tuple(expected):
        return f"{what} has shape {tuple(t.shape)}, expected {tuple(expected)}"
    if not bool(torch.isfinite(t).all()):
        return f"{what} has non-finite values (NaN or Inf)"
    return None


def validate_update(update: Update, expert_shapes: Mapping[str, torch.Size], dense_shapes: Mapping[str, torch.Size],
                    *, num_experts: Optional[Sequence[int]] = None) -> Optional[str]:
    """Why ``update`` must be rejected, or None if it is fine.

    Args:
        expert_shapes: tensor name -> shape every expert delta must have, e.g.
            {"gate_up": [2I, H], "down": [H, I]}; each delta must hold exactly these names.
        dense_shapes: parameter name -> shape of every dense parameter that may be updated.
        num_experts: optionally, experts per MoE layer; (layer, expert) keys outside are rejected.

    Rejected: non-tensors, non-floating dtypes, wrong shapes, NaN/Inf, unknown or missing names,
    malformed keys, negative or non-integer token/sample counts, non-finite utilities.
    """
    if not _is_count(update.num_samples):
        return f"num_samples must be an int >= 0, got {update.num_samples!r}"
    for key, deltas in update.expert_deltas.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(_is_count(k) for k in key)):
            return f"expert key {key!r} is not a (layer, expert) pair of ints >= 0"
        layer, expert = key
        if num_experts is not None and (layer >= len(num_experts) or expert >= num_experts[layer]):
            return f"expert {key} does not exist in the model"
        unknown = sorted(set(deltas) - set(expert_shapes))
        if unknown:
            return f"expert {key}: unknown parameter {unknown[0]!r} (known: {', '.join(expert_shapes)})"
        missing = sorted(set(expert_shapes) - set(deltas))
        if missing:
            return f"expert {key}: missing parameter {missing[0]!r}"
        for name, t in deltas.items():
            problem = _tensor_problem(t, expert_shapes[name], f"expert {key} {name}")
            if problem:
                return problem
    for key, tokens in update.expert_tokens.items():
        if not _is_count(tokens):
            return f"expert_tokens[{key}] must be an int >= 0, got {tokens!r}"
    for name, t in update.dense_deltas.items():
        if name not in dense_shapes:
            return f"unknown dense parameter {name!r}"
        problem = _tensor_problem(t, dense_shapes[name], f"dense {name!r}")
        if problem:
            return problem
    for key, u in update.utilities.items():
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not math.isfinite(u):
            return f"utility of expert {key} is not a finite number: {u!r}"
    return None


# ---------------------------------------------------------------------------- aggregation
def _weighted_mean(items: list[tuple[int, Tensor]]) -> Tensor:
    """sum w_i * t_i / sum w_i over (w_i, t_i) in the given order, in float64, cast back to the
    promoted dtype of the tensors; plain mean when every weight is 0."""
    dtype = items[0][1].dtype
    for _, t in items[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    total = sum(w for w, _ in items)
    if total == 0:
        items, total = [(1, t) for _, t in items], len(items)
    acc = torch.zeros(items[0][1].shape, dtype=torch.float64, device=items[0][1].device)
    for w, t in items:
        acc.add_(t.detach().to(torch.float64), alpha=float(w))
    return (acc / float(total)).to(dtype)


def _sorted_unique(updates: Iterable[Update]) -> list[Update]:
    ordered = sorted(updates, key=lambda u: u.participant)
    for a, b in zip(ordered, ordered[1:]):
        if a.participant == b.participant:
            raise ValueError(f"two updates from participant {a.participant}; aggregate one update per participant")
    return ordered


def aggregate(updates: Sequence[Update]) -> tuple[dict[ExpertKey, dict[str, Tensor]], dict[str, Tensor]]:
    """Expert-wise and dense averages of validated ``updates``.

    Returns:
        expert_mean: (layer, expert) -> name -> delta, for every expert some participant tuned:
            ``sum_i w_i * delta_i / sum_i w_i`` with ``w_i = expert_tokens[(layer, expert)]``
            (missing = 0); plain mean if all of an expert's weights are 0.
        dense_mean: name -> delta, weighted by ``num_samples`` over the updates that carry it.
    The order of ``updates`` does not matter (summation in ascending participant order).
    """
    ordered = _sorted_unique(updates)
    expert_items: dict[ExpertKey, dict[str, list[tuple[int, Tensor]]]] = defaultdict(lambda: defaultdict(list))
    dense_items: dict[str, list[tuple[int, Tensor]]] = defaultdict(list)
    for u in ordered:
        for key, deltas in u.expert_deltas.items():
            w = u.expert_tokens.get(key, 0)
            for name, t in deltas.items():
                expert_items[key][name].append((w, t))
        for name, t in u.dense_deltas.items():
            dense_items[name].append((u.num_samples, t))
    expert_mean = {key: {name: _weighted_mean(items) for name, items in sorted(by_name.items())}
                   for key, by_name in sorted(expert_items.items())}
    dense_mean = {name: _weighted_mean(items) for name, items in sorted(dense_items.items())}
    return expert_mean, dense_mean


# ---------------------------------------------------------------------------- collectives
def gather_updates(local: list[Update], group: Any = None,
                   on_bad_rank: Optional[Callable[[int, Exception], None]] = None) -> list[Update]:
    """Every rank's updates, sorted by participant (on every rank).

    With ``torch.distributed`` initialised and more than one rank, the lists travel as
    pickle-free payloads (:func:`flux.federation.distributed.all_gather_objects`): decoding
    builds only tensors, numbers, strings, containers and :class:`Update` /
    ``LocalCosts`` records.  A rank whose payload does not decode (or is not a list of updates)
    is passed to ``on_bad_rank(rank, error)`` and contributes nothing; without the callback it is
    an error.  Raises ValueError if two updates name the same participant.
    """
    from flux.federation.distributed import all_gather_objects
    from flux.federation.wire import WireError

    parts = all_gather_objects(list(local), group)
    kept: list[Update] = []
    for rank, part in enumerate(parts):
        problem: Optional[Exception] = part if isinstance(part, Exception) else None
        if problem is None and not (isinstance(part, list) and all(isinstance(u, Update) for u in part)):
            problem = WireError(f"rank {rank}: expected a list of updates, got {type(part).__name__}")
        if problem is not None:
            if on_bad_rank is None:
                raise problem
            on_bad_rank(rank, problem)
            continue
        kept.extend(part)
    return _sorted_unique(kept)


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` from rank ``src`` on every rank (pickle-free; identity without a process group)."""
    from flux.federation.distributed import broadcast

    return broadcast(obj, src=src, group=group)


# ---------------------------------------------------------------------------- applying
def apply_expert_deltas(handle: Any, expert_mean: Mapping[ExpertKey, Mapping[str, Tensor]]) -> int:
    """Add aggregated deltas to the global experts through the ``flux.patch`` handle.

    ``handle.moe_layers[l].expert_weights(e)`` is read and ``set_expert_weights(e, ...)`` written
    with ``old + delta`` (summed in float64, rounded once to the weight dtype).  Experts without
    an entry keep their exact weights.  Returns the number of experts updated.
    """
    from flux.moe.merged_view import ExpertWeights

    def add(old: Optional[Tensor], delta: Optional[Tensor]) -> Optional[Tensor]:
        if delta is None:
            return old
        if old is None:
            raise ValueError("a bias delta was given but the experts have no biases")
        return (old.detach().to(torch.float64) + delta.detach().to(old.device, torch.float64)).to(old.dtype)

    for (layer_idx, expert), deltas in sorted(expert_mean.items()):
        layer = handle.moe_layers[layer_idx]
        old = layer.expert_weights(expert)
        new = ExpertWeights(
            gate_up=add(old.gate_up, deltas["gate_up"]),
            down=add(old.down, deltas["down"]),
            gate_up_bias=add(old.gate_up_bias, deltas.get("gate_up_bias")),
            down_bias=add(old.down_bias, deltas.get("down_bias")),
        )
        layer.set_expert_weights(expert, new)
    return len(expert_mean)
