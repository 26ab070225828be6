"""flux.federation.clock: measured throughput, compute/transfer conversion, round time."""
from __future__ import annotations

import pytest
import torch

from flux.federation.clock import ParticipantTime, SimClock, measure_matmul_flops, round_time
from flux.federation.devices import DeviceProfile

DEV = DeviceProfile("dev", 1 << 30, flops=4e12, host_link_bytes_per_s=2e9, network_bytes_per_s=1e8)


def test_measured_throughput_is_plausible_and_cached():
    torch.set_num_threads(1)
    rate = measure_matmul_flops(size=128, repeats=3)
    assert 1e7 < rate < 1e13  # between a very slow core and a GPU
    assert measure_matmul_flops(size=128, repeats=3) == rate  # cached: the same number, not a re-measurement
    with pytest.raises(ValueError):
        measure_matmul_flops(size=0)


def test_compute_rescales_by_the_flops_ratio_and_transfer_is_bytes_over_bandwidth():
    clock = SimClock(machine_flops=1e11)
    assert clock.compute(2.0, DEV) == pytest.approx(2.0 * 1e11 / 4e12)  # 0.05 s
    assert clock.transfer(5e8, DEV.network_bytes_per_s) == pytest.approx(5.0)
    assert clock.transfer(0, 1.0) == 0.0
    with pytest.raises(ValueError):
        clock.transfer(10, 0.0)
    with pytest.raises(ValueError):
        SimClock(0.0)


def test_round_time_is_the_slowest_participant_plus_aggregation():
    a = ParticipantTime(download_s=1.0, profile_s=0.5, compute_s=2.0, offload_s=0.0, upload_s=0.5)
    b = ParticipantTime(download_s=1.0, profile_s=3.0, compute_s=1.0, offload_s=1.0, upload_s=0.5)
    assert a.total == 3.5 and b.total == 3.5
    # without stale profiling every second of profiling is on the critical path
    assert round_time([a, b], 1.0, stale_profiling=False) == pytest.approx(max(3.5 + 0.5, 3.5 + 3.0) + 1.0)
    # with stale profiling it overlaps the aggregation: a hides fully, b shows 3.0 - 1.0
    assert round_time([a, b], 1.0, stale_profiling=True) == pytest.approx(max(3.5, 3.5 + 2.0) + 1.0)
    assert round_time([], 0.25, stale_profiling=True) == 0.25


def test_worked_example_of_the_docs():
    """docs/federation.md walks through this round; keep the two in sync."""
    from flux.federation.devices import DEVICE_CLASSES, scale_profile

    dev = scale_profile(DEVICE_CLASSES["rtx3060-12gb"], 26_800_000)  # fp32: s = 0.004, s_bytes = 0.008
    assert dev.flops == pytest.approx(1.02e11) and dev.network_bytes_per_s == pytest.approx(5e5)
    assert dev.host_link_bytes_per_s == pytest.approx(2e8) and dev.memory_bytes == 103_079_215
    clock = SimClock(machine_flops=5.1e10)
    pt = ParticipantTime(download_s=clock.transfer(107_200_000, dev.network_bytes_per_s),
                         profile_s=clock.compute(0.2, dev), compute_s=clock.compute(1.0, dev),
                         offload_s=clock.transfer(0, dev.host_link_bytes_per_s),
                         upload_s=clock.transfer(5_360_000, dev.network_bytes_per_s))
    assert (pt.download_s, pt.profile_s, pt.compute_s, pt.upload_s) == pytest.approx((214.4, 0.1, 0.5, 10.72))
    # the real RTX 3060 downloading LLaMA-MoE-3.5B in bf16 over 500 Mbit/s takes the same time
    assert pt.download_s == pytest.approx(6.7e9 * 2 / 62.5e6)
    assert round_time([pt], 0.05, stale_profiling=True) == pytest.approx(225.72)
    assert round_time([pt], 0.05, stale_profiling=False) == pytest.approx(225.77)
    assert round_time([pt], 0.05, stale_profiling=True, idle_last_round=[True]) == pytest.approx(225.67)


def test_visible_profile_by_branch_hand_computed():
    """aggregation 1.0; a profiles 0.5 s, b 3.0 s (both total 3.5 s)."""
    from flux.federation.clock import slowest_participant

    a = ParticipantTime(download_s=1.0, profile_s=0.5, compute_s=2.0, offload_s=0.0, upload_s=0.5)
    b = ParticipantTime(download_s=1.0, profile_s=3.0, compute_s=1.0, offload_s=1.0, upload_s=0.5)
    # no stale profiling: all of it shows, idle or not (round 1 / the paper without staleness)
    for idle in (False, True):
        assert a.visible_profile_s(1.0, stale_profiling=False, idle_last_round=idle) == 0.5
        assert b.critical_path(1.0, stale_profiling=False, idle_last_round=idle) == 3.5 + 3.0
    # stale, sampled last round: only what outlasts the aggregation shows
    assert a.visible_profile_s(1.0, stale_profiling=True) == 0.0
    assert b.visible_profile_s(1.0, stale_profiling=True) == 2.0
    # stale, idle last round: the whole idle round hid it
    assert b.visible_profile_s(1.0, stale_profiling=True, idle_last_round=True) == 0.0
    assert b.critical_path(1.0, stale_profiling=True, idle_last_round=True) == 3.5
    # round: b idle -> both paths 3.5, the first is the slowest; a idle -> b's 5.5 is
    assert round_time([a, b], 1.0, stale_profiling=True, idle_last_round=[False, True]) == 3.5 + 1.0
    assert slowest_participant([a, b], 1.0, stale_profiling=True, idle_last_round=[False, True]) == 0
    assert round_time([a, b], 1.0, stale_profiling=True, idle_last_round=[True, False]) == 5.5 + 1.0
    assert slowest_participant([a, b], 1.0, stale_profiling=True, idle_last_round=[True, False]) == 1
    assert round_time([a, b], 1.0, stale_profiling=False, idle_last_round=[True, True]) == 6.5 + 1.0
    assert slowest_participant([], 1.0, stale_profiling=True) is None
    assert round_time([], 0.25, stale_profiling=True, idle_last_round=[]) == 0.25
    with pytest.raises(ValueError, match="flags"):
        round_time([a, b], 1.0, stale_profiling=True, idle_last_round=[True])


def test_no_idle_flags_is_bit_identical_to_the_old_clock():
    """flux.hide_idle_profiling = false: all flags False, exactly max(total + max(0, p - agg)) + agg."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        pts = [ParticipantTime(*torch.rand(5, generator=gen, dtype=torch.float64).mul(10).tolist())
               for _ in range(int(torch.randint(1, 6, (1,), generator=gen)))]
        agg = float(torch.rand(1, generator=gen, dtype=torch.float64)) * 3
        for stale in (False, True):
            old = max(p.total + (max(0.0, p.profile_s - agg) if stale else p.profile_s) for p in pts) + agg
            assert round_time(pts, agg, stale_profiling=stale) == old
            assert round_time(pts, agg, stale_profiling=stale, idle_last_round=[False] * len(pts)) == old
