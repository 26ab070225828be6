"""Building a participant's upload: expert deltas against the global weights, their aggregation
weights, and the :class:`~flux.federation.update.Update` with its costs."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from torch import Tensor, nn

from flux.federation.update import ExpertKey, LocalCosts, Update


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Total bytes of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the global model a participant downloads the first time."""
    return tensor_bytes(p for p in model.parameters() if p.device.type != "meta")


def expert_tokens(handle) -> dict[ExpertKey, int]:
    """(layer, expert) -> tokens routed there since the last ``reset_counts`` (aggregation weights)."""
    out = {}
    for l, layer in enumerate(handle.moe_layers):
        for e, c in enumerate(layer.counts.tolist()):
            if c:
                out[(l, e)] = int(c)
    return out


def clone_weights(w):
    """A detached copy of an ``ExpertWeights`` (biases stay None when absent)."""
    return dataclasses.replace(w, **{f.name: getattr(w, f.name).detach().clone()
                                     for f in dataclasses.fields(w) if getattr(w, f.name) is not None})


def expert_delta(after, before) -> dict[str, Tensor]:
    """{"gate_up" [2I, H], "down" [H, I] (, "gate_up_bias" [2I], "down_bias" [H])} differences of
    two ``ExpertWeights`` (``after - before``, their dtype)."""
    out = {"gate_up": (after.gate_up.detach() - before.gate_up.detach()),
           "down": (after.down.detach() - before.down.detach())}
    if after.gate_up_bias is not None:
        out["gate_up_bias"] = after.gate_up_bias.detach() - before.gate_up_bias.detach()
        out["down_bias"] = after.down_bias.detach() - before.down_bias.detach()
    return out


def view_expert_deltas(handle, tokens: dict[ExpertKey, int], *, routed_only: bool,
                       extra: Optional[dict[int, dict]] = None) -> tuple[dict, dict]:
    """Deltas of the experts a participant trained under merged views, against the originals.

    Args:
        tokens: (layer, expert) -> tokens routed there this round (:func:`expert_tokens`).
        routed_only: skip trained experts no token reached (their delta is zero anyway).
        extra: per layer, {expert: ExpertWeights} of experts trained outside the view's
            trainable stacks (FLUX's zeroth-order exploration experts).

    Returns:
        ``(deltas, weights)``: (layer, expert) -> {"gate_up", "down"} differences, and the
        aggregation weight (routed tokens) of each.
    """
    deltas, weights = {}, {}
    for l, layer in enumerate(handle.moe_layers):
        current = {**layer.tuned_weights(), **((extra or {}).get(l, {}))}
        for e, w in current.items():
            if routed_only and (l, e) not in tokens:
                continue
            deltas[(l, e)] = expert_delta(w, layer.source.expert(e))
            weights[(l, e)] = tokens.get((l, e), 0)
    return deltas, weights


def make_update(pid: int, stats, model: nn.Module, deltas: dict, tokens: dict, dense_deltas: dict, *,
                peak_memory_bytes: int, utilities: Optional[dict] = None, profile_s: float = 0.0,
                overhead_s: float = 0.0, offload_bytes: int = 0, bytes_up: Optional[int] = None,
                **extra: float) -> Update:
    """The :class:`Update` a participant uploads, with the costs every method reports.

    Args:
        stats: the ``LocalStats`` of its local training.
        deltas: (layer, expert) -> {"gate_up" [2I, H], "down" [H, I]} weight differences.
        tokens: (layer, expert) -> tokens routed there (the aggregation weights).
        dense_deltas: name -> difference of each trained non-expert parameter.
        bytes_up: the bytes the deltas take on the wire (None: their full-precision size).
        extra: method-specific numbers, kept in ``costs.extra``.
    """
    if bytes_up is None:
        bytes_up = tensor_bytes(t for d in deltas.values() for t in d.values()) + tensor_bytes(dense_deltas.values())
    costs = LocalCosts(compute_s=stats.seconds, loss=stats.losses[-1] if stats.losses else float("nan"),
                       bytes_up=bytes_up, bytes_down=model_weight_bytes(model), peak_memory_bytes=peak_memory_bytes,
                       profile_s=profile_s, overhead_s=overhead_s, offload_bytes=offload_bytes, extra=dict(extra))
    return Update(participant=pid, expert_deltas=deltas, expert_tokens=tokens, dense_deltas=dense_deltas,
                  num_samples=len(stats.samples), utilities=utilities or {}, costs=costs)
