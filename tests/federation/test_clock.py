"""flux.federation.clock: measured throughput, compute/transfer conversion, round time."""
from __future__ import annotations

import pytest
import torch

from flux.federation.clock import ParticipantTime, SimClock, measure_matmul_flops, round_time
from flux.federation.profiles import DeviceProfile

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
    from flux.federation.profiles import DEVICE_CLASSES, scale_profile

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
