"""What a participant sends back after a round, and what a round's failures look like.

Leaf module (torch types only): the engine, the aggregation and every method share these records.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass
class LocalCosts:
    """What one participant's round cost, measured on this machine or counted.

    Attributes:
        compute_s: wall seconds of local training here (the clock rescales them to the device).
        loss: the last local step's training loss (NaN when no step ran).
        bytes_up: bytes of the update (expert and dense deltas).
        bytes_down: bytes the participant downloads this round (set by the engine).
        peak_memory_bytes: resident bytes on the participant's device.
        profile_s: wall seconds of activation profiling here (hidden or not: the engine decides).
        overhead_s: wall seconds of method work outside training (merging, role bookkeeping).
        offload_bytes: bytes moved over the host link (offloading baselines).
        extra: method-specific numbers (e.g. FLUX's ``tuned_share``), JSON-friendly.
    """

    compute_s: float
    loss: float
    bytes_up: int
    bytes_down: int
    peak_memory_bytes: int
    profile_s: float = 0.0
    overhead_s: float = 0.0
    offload_bytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Update:
    """What one participant uploads after a round.

    Attributes:
        participant: participant id.
        expert_deltas: (layer, expert) -> {"gate_up": [2I, H], "down": [H, I]} weight deltas
            (new - old), floating point; biases as "gate_up_bias" [2I] / "down_bias" [H] when the
            experts have them.
        expert_tokens: (layer, expert) -> tokens this participant routed to the expert this
            round (the aggregation weight).
        dense_deltas: name -> delta of a non-expert trainable parameter (e.g. the classifier head).
        num_samples: local samples trained on (the weight of the dense deltas).
        utilities: (layer, expert) -> utility for role assignment.
        costs: what the round cost the participant (:class:`LocalCosts`); None only in
            hand-built updates (tests).
    """

    participant: int
    expert_deltas: dict[ExpertKey, dict[str, Tensor]] = field(default_factory=dict)
    expert_tokens: dict[ExpertKey, int] = field(default_factory=dict)
    dense_deltas: dict[str, Tensor] = field(default_factory=dict)
    num_samples: int = 0
    utilities: dict[ExpertKey, float] = field(default_factory=dict)
    costs: LocalCosts | None = None


@dataclass(frozen=True)
class Failure:
    """A sampled participant whose update did not reach aggregation, and why.

    ``kind`` is "dropout" (it never answered), "rejected" (its update failed validation) or
    "deadline" (it answered after ``faults.deadline_s``)."""

    participant: int
    kind: str
    reason: str


@dataclass
class RoundDelta:
    """A method's aggregate of a round: what is added to the global model.

    Attributes:
        experts: (layer, expert) -> name -> delta (same layout as :attr:`Update.expert_deltas`).
        dense: name -> delta of a non-expert parameter.
    """

    experts: dict[ExpertKey, dict[str, Tensor]] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
