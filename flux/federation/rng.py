"""Named random streams of a federated run.

Every random draw of a run comes from :func:`participant_generator` keyed by (run seed, round,
participant, stream), so a draw is the same on any rank layout and after a resume.  Each kind of
draw has its own stream, named here once: two kinds of draws must never share a stream (they
would be correlated).
"""
from __future__ import annotations

import enum

import torch


class Stream(enum.IntEnum):
    """The streams; the values are part of the run's reproducibility (changing one changes runs)."""

    LOCAL_BATCHES = 0  # a participant's mini-batch order
    ROLE_ASSIGNMENT = 1  # FLUX's exploration draws (server side)
    PARTICIPANT_SAMPLING = 2  # which participants a round samples
    DROPOUT = 3  # simulated participant failures
    ZEROTH_ORDER = 4  # FLUX's SPSA perturbations of exploration experts
    PROFILE_SAMPLE = 5  # which local samples a participant profiles
    FMQ_ROUNDING = 6  # FMQ's stochastic rounding
    BUDGET_PROBE = 7  # which local samples FLUX's measured budget policy measures its views on


def participant_generator(seed: int, round_idx: int, pid: int, stream: Stream = Stream.LOCAL_BATCHES) -> torch.Generator:
    """A CPU generator unique to (seed, round, participant, stream); independent of rank layout."""
    # Large odd multipliers keep the streams of neighbouring (round, pid) pairs apart.
    key = (seed * 1_000_003 + round_idx * 7_919 + pid * 104_729 + int(stream) * 15_485_863) % (2**63 - 1)
    return torch.Generator().manual_seed(key)
