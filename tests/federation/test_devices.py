"""flux.federation.devices: nominal classes, scaling to the model in use, assignment."""
from __future__ import annotations

import math

import pytest

from flux.federation.config import ConfigError, DevicesConfig
from flux.federation.devices import (DEVICE_CLASSES, REFERENCE_BYTES_PER_PARAM, REFERENCE_MODEL_PARAMS,
                                      DeviceProfile, participant_profiles,
                                      profile_from_dict, scale_profile)

GiB = 1 << 30


def test_named_classes_carry_the_documented_nominal_numbers():
    r4090, r3060, l20 = (DEVICE_CLASSES[n] for n in ("rtx4090-24gb", "rtx3060-12gb", "l20-48gb"))
    assert (r4090.memory_bytes, r3060.memory_bytes, l20.memory_bytes) == (24 * GiB, 12 * GiB, 48 * GiB)
    assert r4090.flops == 165.2e12 and r3060.flops == 25.5e12 and l20.flops == 119.5e12
    assert r4090.host_link_bytes_per_s == 25e9
    assert r4090.network_bytes_per_s == 125e6 and r3060.network_bytes_per_s == 62.5e6
    for name, p in DEVICE_CLASSES.items():
        assert p.name == name


@pytest.mark.parametrize("bytes_per_param", [4, 2])
def test_scaling_keeps_the_model_fraction_and_the_seconds(bytes_per_param):
    dev = DEVICE_CLASSES["rtx3060-12gb"]
    params = 2_000_000
    s = params / REFERENCE_MODEL_PARAMS
    small = scale_profile(dev, params, bytes_per_param=bytes_per_param)
    assert small.name == dev.name
    # the same fraction of the model's weight bytes fits
    ref_bytes, run_bytes = REFERENCE_MODEL_PARAMS * REFERENCE_BYTES_PER_PARAM, params * bytes_per_param
    assert small.memory_bytes == math.floor(dev.memory_bytes * run_bytes / ref_bytes)
    assert small.memory_bytes / run_bytes == pytest.approx(dev.memory_bytes / ref_bytes, rel=1e-6)
    # FLOPs scale with parameters, transferred bytes with weight bytes: the seconds stay the same
    assert 6 * params / small.flops == pytest.approx(6 * REFERENCE_MODEL_PARAMS / dev.flops)
    assert small.flops == pytest.approx(dev.flops * s)
    assert run_bytes / small.network_bytes_per_s == pytest.approx(ref_bytes / dev.network_bytes_per_s)
    assert run_bytes / small.host_link_bytes_per_s == pytest.approx(ref_bytes / dev.host_link_bytes_per_s)
    if bytes_per_param == 2:  # same precision as the reference: everything scales by s
        assert small.network_bytes_per_s == pytest.approx(dev.network_bytes_per_s * s)


def test_scaling_rejects_bad_arguments():
    dev = DEVICE_CLASSES["rtx3060-12gb"]
    with pytest.raises(ValueError, match="model_params"):
        scale_profile(dev, 0)
    with pytest.raises(ValueError, match="bytes_per_param"):
        scale_profile(dev, 10, bytes_per_param=0)


def test_classes_are_assigned_round_robin_and_scaled():
    cfg = DevicesConfig(classes=["rtx4090-24gb", "rtx3060-12gb", "l20-48gb"])
    out = participant_profiles(cfg, 7, 1_000_000)
    assert [p.name for p in out] == ["rtx4090-24gb", "rtx3060-12gb", "l20-48gb"] * 2 + ["rtx4090-24gb"]
    assert out[0] == scale_profile(DEVICE_CLASSES["rtx4090-24gb"], 1_000_000)
    assert participant_profiles(cfg, 2, 1_000_000, bytes_per_param=2)[1] == \
        scale_profile(DEVICE_CLASSES["rtx3060-12gb"], 1_000_000, bytes_per_param=2)
    assert out[0].memory_bytes < DEVICE_CLASSES["rtx4090-24gb"].memory_bytes


def test_explicit_profiles_are_used_unscaled():
    raw = {"name": "mine", "memory_bytes": 5_000_000, "flops": 1e12, "host_link_bytes_per_s": 1e9,
           "network_bytes_per_s": 1e7}
    out = participant_profiles(DevicesConfig(profiles=[raw]), 3, 123)
    assert out == [DeviceProfile("mine", 5_000_000, 1e12, 1e9, 1e7)] * 3


def test_unknown_class_and_bad_profiles_raise_config_errors():
    with pytest.raises(ConfigError) as info:
        participant_profiles(DevicesConfig(classes=["rtx4090-24gb", "h100"]), 2, 1000)
    assert info.value.key == "devices.classes" and "h100" in str(info.value)
    good = {"name": "x", "memory_bytes": 10, "flops": 1.0, "host_link_bytes_per_s": 1.0, "network_bytes_per_s": 1.0}
    assert profile_from_dict(good).memory_bytes == 10
    for bad, key in [({**good, "flops": 0}, "devices.profiles.flops"),
                     ({**good, "memory_bytes": True}, "devices.profiles.memory_bytes"),
                     ({**good, "speed": 1}, "devices.profiles.speed"),
                     ({k: v for k, v in good.items() if k != "name"}, "devices.profiles.name"),
                     ({**good, "network_bytes_per_s": float("inf")}, "devices.profiles.network_bytes_per_s")]:
        with pytest.raises(ConfigError) as info:
            profile_from_dict(bad)
        assert info.value.key == key
