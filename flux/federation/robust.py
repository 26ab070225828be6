"""Bounds on what one participant's update can do to the global model (poisoning defence).

Participants are not trusted.  Validation (``aggregate.validate_update``) rejects malformed
updates; the checks here bound well-formed but hostile ones, per round, before aggregation:

* **Expert-delta size** against a robust statistic of the round: each expert delta's RMS
  (root-mean-square over its elements) is compared with the *median over participants* of their
  update RMS.  Local training is AdamW for every method, which moves each weight by about the
  learning rate per step whatever the gradient's scale, so honest deltas of one round have
  similar RMS; a delta more than ``max_delta_rms_ratio`` times the median is clipped to that size
  (``action = "clip"``) or dropped (``"reject"``).  The median resists fewer than half of a
  round's participants being hostile, so the check needs at least 3 updates in a round (with 2,
  one hostile update moves the median half-way to itself); rounds with fewer skip it.
* **Token and sample counts** (the aggregation weights) against what the participant's local
  round can hold: at most ``max_samples`` trained samples, and per expert at most
  ``max_samples * seq_len`` routed tokens (a token reaches an expert at most once).  Larger
  claims are capped.

Every intervention is returned as an event (participant, expert, check, action, value, bound)
for ``metrics.jsonl``.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch

from flux.federation.update import Update

ACTIONS = ("clip", "reject")
MIN_UPDATES = 3  # below this a median is not robust


def _rms(tensors) -> float:
    sq, n = 0.0, 0
    for t in tensors:
        sq += float(t.detach().double().pow(2).sum())
        n += t.numel()
    return math.sqrt(sq / n) if n else 0.0


def bound_updates(updates: Sequence[Update], *, max_delta_rms_ratio: float, action: str, max_samples: int,
                  seq_len: int) -> list[dict]:
    """Apply the module's bounds to ``updates`` in place; returns the events.

    Args:
        updates: the round's validated updates.
        max_delta_rms_ratio: expert-delta RMS bound as a multiple of the round's median
            participant RMS (0 disables the check).
        action: "clip" (scale the delta down to the bound) or "reject" (drop that expert delta).
        max_samples: samples one participant trains in a round (``local_steps * batch_size``).
        seq_len: tokens per sample.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    events: list[dict] = []
    token_cap = max_samples * seq_len
    for u in updates:
        if u.num_samples > max_samples:
            events.append(_event(u, None, "samples", "capped", u.num_samples, max_samples))
            u.num_samples = max_samples
        for key, tokens in list(u.expert_tokens.items()):
            if tokens > token_cap:
                events.append(_event(u, key, "tokens", "capped", tokens, token_cap))
                u.expert_tokens[key] = token_cap
    if max_delta_rms_ratio <= 0:
        return events
    per_participant = [_rms(t for d in u.expert_deltas.values() for t in d.values()) for u in updates
                       if u.expert_deltas]
    if len(per_participant) < MIN_UPDATES:
        return events
    median = statistics.median(per_participant)
    bound = max_delta_rms_ratio * median
    if not bound > 0:
        return events
    for u in updates:
        for key in list(u.expert_deltas):
            rms = _rms(u.expert_deltas[key].values())
            if rms <= bound:
                continue
            if action == "reject":
                del u.expert_deltas[key]
                u.expert_tokens.pop(key, None)
                events.append(_event(u, key, "delta_rms", "rejected", rms, bound))
            else:
                scale = bound / rms
                u.expert_deltas[key] = {n: (t.double() * scale).to(t.dtype) for n, t in u.expert_deltas[key].items()}
                events.append(_event(u, key, "delta_rms", "clipped", rms, bound))
    return events


def max_delta_rms_ratio(updates: Sequence[Update]) -> float | None:
    """The largest expert-delta RMS over the round's median participant RMS (how close honest
    updates come to the bound; None without expert deltas)."""
    per_participant = [_rms(t for d in u.expert_deltas.values() for t in d.values()) for u in updates
                       if u.expert_deltas]
    if not per_participant or statistics.median(per_participant) == 0:
        return None
    median = statistics.median(per_participant)
    return max(_rms(d.values()) for u in updates for d in u.expert_deltas.values()) / median


def _event(u: Update, key, check: str, action: str, value: float, bound: float) -> dict:
    return {"participant": u.participant, "expert": list(key) if key is not None else None, "check": check,
            "action": action, "value": round(float(value), 6), "bound": round(float(bound), 6)}


__all__ = ["ACTIONS", "bound_updates", "max_delta_rms_ratio"]
