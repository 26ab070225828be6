"""The participants' simulated clock (docs/federation.md has the model and a worked example).

Compute is *measured* on this machine and rescaled to the participant's device:
``compute_s = measured_s * machine_flops / device.flops`` where ``machine_flops`` is this
machine's measured fp32 matmul throughput.  Transfers are *modelled*: ``bytes / bandwidth``.
A synchronous round lasts as long as its slowest participant plus the server's aggregation.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from flux.federation.devices import DeviceProfile

# (size, repeats, threads) -> FLOP/s; the machine does not change within a process.
_MATMUL_FLOPS_CACHE: dict[tuple[int, int, int], float] = {}


def measure_matmul_flops(size: int = 512, repeats: int = 5) -> float:
    """Median fp32 throughput (FLOP/s) of a ``size x size`` matmul with the current thread count.

    One warm-up, then ``repeats`` timed runs of ``2 * size**3`` FLOPs each; cached per process
    and thread count.
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be >= 1, got size={size}, repeats={repeats}")
    key = (size, repeats, torch.get_num_threads())
    if key not in _MATMUL_FLOPS_CACHE:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen)
        b = torch.randn(size, size, generator=gen)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)  # warm-up: page in, pick kernels
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            rates.append(2.0 * size**3 / max(time.perf_counter() - t0, 1e-9))
        _MATMUL_FLOPS_CACHE[key] = float(statistics.median(rates))
    return _MATMUL_FLOPS_CACHE[key]


class SimClock:
    """Converts measured seconds and moved bytes into a participant's simulated seconds."""

    def __init__(self, machine_flops: float) -> None:
        if not machine_flops > 0:
            raise ValueError(f"machine_flops must be > 0, got {machine_flops}")
        self.machine_flops = float(machine_flops)

    def compute(self, measured_s: float, profile: DeviceProfile) -> float:
        """Seconds ``profile`` needs for work that took ``measured_s`` here."""
        if measured_s < 0:
            raise ValueError(f"measured_s must be >= 0, got {measured_s}")
        return measured_s * self.machine_flops / profile.flops

    @staticmethod
    def transfer(nbytes: int | float, bytes_per_s: float) -> float:
        """Seconds to move ``nbytes`` over a link of ``bytes_per_s``."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s}")
        return nbytes / bytes_per_s


@dataclass(frozen=True)
class ParticipantTime:
    """One participant's simulated seconds in a round, by phase."""

    download_s: float
    profile_s: float
    compute_s: float
    offload_s: float
    upload_s: float

    @property
    def total(self) -> float:
        """Critical path *without* profiling (download + compute + offload + upload); profiling
        is added by :meth:`critical_path`, depending on whether it is hidden."""
        return self.download_s + self.compute_s + self.offload_s + self.upload_s

    def visible_profile_s(self, aggregation_s: float, *, stale_profiling: bool, idle_last_round: bool = False) -> float:
        """Seconds of profiling on this participant's critical path.

        Without stale profiling: all of ``profile_s``.  With it, profiling runs while the server
        aggregates the previous round, so only the part longer than the aggregation shows:
        ``max(0, profile_s - aggregation_s)``; and none of it when the participant sat the
        previous round out (``idle_last_round``): the model it profiles (the previous round's
        starting model) was available for that whole idle round.
        """
        if not stale_profiling:
            return self.profile_s
        if idle_last_round:
            return 0.0
        return max(0.0, self.profile_s - aggregation_s)

    def critical_path(self, aggregation_s: float, *, stale_profiling: bool, idle_last_round: bool = False) -> float:
        """Seconds this participant adds to the round: :attr:`total` plus :meth:`visible_profile_s`."""
        return self.total + self.visible_profile_s(aggregation_s, stale_profiling=stale_profiling,
                                                   idle_last_round=idle_last_round)


def slowest_participant(participant_times: Sequence[ParticipantTime], aggregation_s: float, *, stale_profiling: bool,
                        idle_last_round: Optional[Sequence[bool]] = None) -> Optional[int]:
    """Position in ``participant_times`` of the longest critical path (the first on ties); None
    when there are none.  ``idle_last_round[i]`` (default all False) says participant i sat the
    previous round out (:meth:`ParticipantTime.visible_profile_s`)."""
    if aggregation_s < 0:
        raise ValueError(f"aggregation_s must be >= 0, got {aggregation_s}")
    idle = [False] * len(participant_times) if idle_last_round is None else list(idle_last_round)
    if len(idle) != len(participant_times):
        raise ValueError(f"idle_last_round has {len(idle)} flags for {len(participant_times)} participants")
    paths = [p.critical_path(aggregation_s, stale_profiling=stale_profiling, idle_last_round=i)
             for p, i in zip(participant_times, idle)]
    return max(range(len(paths)), key=paths.__getitem__) if paths else None


def round_time(participant_times: Sequence[ParticipantTime], aggregation_s: float, *, stale_profiling: bool,
               idle_last_round: Optional[Sequence[bool]] = None) -> float:
    """Simulated length of a synchronous round: the slowest participant, then aggregation.

    ``aggregation_s`` is also the window that hides stale profiling (the previous round's
    aggregation is taken to last as long as this one's); ``idle_last_round`` as in
    :func:`slowest_participant`.  No participants: just aggregation.
    """
    i = slowest_participant(participant_times, aggregation_s, stale_profiling=stale_profiling,
                            idle_last_round=idle_last_round)
    if i is None:
        return aggregation_s
    idle = bool(idle_last_round[i]) if idle_last_round is not None else False
    return participant_times[i].critical_path(aggregation_s, stale_profiling=stale_profiling,
                                              idle_last_round=idle) + aggregation_s
