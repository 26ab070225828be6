"""Participant device profiles: memory, compute speed, host link and network.

The named classes carry nominal numbers of real GPUs for the paper's model (LLaMA-MoE-3.5B,
6.7e9 parameters, bf16 weights).  A run uses a much smaller model, so every profile is scaled:
compute by ``s = model_params / REFERENCE_MODEL_PARAMS``, memory and both bandwidths by the ratio
of *weight bytes* ``s_bytes = s * bytes_per_param / REFERENCE_BYTES_PER_PARAM`` (runs here keep
fp32 weights, 4 bytes, where the real devices hold bf16, 2 bytes).  The scaled device then holds
the same *fraction* of the model's weights and spends the same seconds on compute and transfers
as the real device would on the reference model.  docs/federation.md lists the numbers.

Sources of the nominal numbers (dense, no sparsity; bf16 tensor-core throughput with fp32
accumulation, the precision mixed-precision training uses):
* RTX 4090: NVIDIA Ada Lovelace architecture whitepaper, appendix table: 165.2 TFLOPS
  (82.6 TFLOPS is the non-tensor fp32 rate), 24 GB GDDR6X.
* RTX 3060 12 GB: NVIDIA Ampere GA102 whitepaper rates scaled to GA106 (112 tensor cores at
  1.78 GHz): 25.5 TFLOPS, 12 GB GDDR6.
* L20 48 GB (the paper's GPU): NVIDIA L20 product brief: 119.5 TFLOPS bf16/fp16, 48 GB GDDR6.
* Host link: all three sit on PCIe 4.0 x16 (31.5 GB/s raw per direction); 25 GB/s is a typical
  measured pinned host-to-device copy rate.
* Network: participants are separate organisations on a WAN: 1 Gbit/s (125 MB/s) for the
  4090 and L20 sites, 500 Mbit/s (62.5 MB/s) for the 3060 site.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from flux.federation.errors import ConfigError

if TYPE_CHECKING:
    from flux.federation.config import DevicesConfig

GiB = 1 << 30
GBIT_PER_S = 1e9 / 8  # bytes per second of a 1 Gbit/s link

# LLaMA-MoE-3.5B (the paper's main model): 6.7e9 parameters in total, 3.5e9 active per token,
# held in bf16 on the participants' GPUs.
REFERENCE_MODEL_PARAMS = 6.7e9
REFERENCE_BYTES_PER_PARAM = 2


@dataclass(frozen=True)
class DeviceProfile:
    """One participant's accelerator.

    Attributes:
        name: the class name (scaled profiles keep it, so every number can name its profile).
        memory_bytes: device memory budget in bytes.
        flops: compute throughput in FLOP/s (the clock divides measured work by it).
        host_link_bytes_per_s: host <-> device bandwidth (PCIe), used for offloading.
        network_bytes_per_s: participant <-> server bandwidth, used for model download/upload.
    """

    name: str
    memory_bytes: int
    flops: float
    host_link_bytes_per_s: float
    network_bytes_per_s: float


DEVICE_CLASSES: dict[str, DeviceProfile] = {
    "rtx4090-24gb": DeviceProfile("rtx4090-24gb", 24 * GiB, 165.2e12, 25e9, 1 * GBIT_PER_S),
    "rtx3060-12gb": DeviceProfile("rtx3060-12gb", 12 * GiB, 25.5e12, 25e9, 0.5 * GBIT_PER_S),
    "l20-48gb": DeviceProfile("l20-48gb", 48 * GiB, 119.5e12, 25e9, 1 * GBIT_PER_S),
}

_NUMERIC_FIELDS = ("memory_bytes", "flops", "host_link_bytes_per_s", "network_bytes_per_s")


def scale_profile(profile: DeviceProfile, model_params: int, *, bytes_per_param: float = 4) -> DeviceProfile:
    """``profile`` shrunk to a model of ``model_params`` parameters stored with
    ``bytes_per_param`` bytes each (4: fp32, what runs here use).

    ``flops * s`` with ``s = model_params / REFERENCE_MODEL_PARAMS``; memory and both bandwidths
    ``* s_bytes`` with ``s_bytes = s * bytes_per_param / REFERENCE_BYTES_PER_PARAM``.  With
    ``bytes_per_param = 2`` (bf16, like the reference) both factors are ``s``.  Memory is rounded
    down to whole bytes (a budget must not grow by rounding).
    """
    if isinstance(model_params, bool) or not isinstance(model_params, int) or model_params < 1:
        raise ValueError(f"model_params must be an int >= 1, got {model_params!r}")
    if not bytes_per_param > 0:
        raise ValueError(f"bytes_per_param must be > 0, got {bytes_per_param!r}")
    s = model_params / REFERENCE_MODEL_PARAMS
    s_bytes = s * bytes_per_param / REFERENCE_BYTES_PER_PARAM
    return dataclasses.replace(
        profile,
        memory_bytes=int(math.floor(profile.memory_bytes * s_bytes)),
        flops=profile.flops * s,
        host_link_bytes_per_s=profile.host_link_bytes_per_s * s_bytes,
        network_bytes_per_s=profile.network_bytes_per_s * s_bytes,
    )


def profile_from_dict(d: Mapping[str, Any], key: str = "devices.profiles") -> DeviceProfile:
    """A :class:`DeviceProfile` from an explicit config table (bytes, FLOP/s, bytes/s).

    Raises:
        ConfigError: missing or unknown fields, wrong types, non-positive numbers.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(key, f"must be a table, got {d!r}")
    names = [f.name for f in dataclasses.fields(DeviceProfile)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown device field (known: {', '.join(names)})")
    missing = [n for n in names if n not in d]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}", f"missing (a device profile needs {', '.join(names)})")
    if not isinstance(d["name"], str) or not d["name"]:
        raise ConfigError(f"{key}.name", f"must be a non-empty string, got {d['name']!r}")
    for n in _NUMERIC_FIELDS:
        v = d[n]
        whole = n == "memory_bytes"
        if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)):
            raise ConfigError(f"{key}.{n}", f"must be {'an integer' if whole else 'a number'}, got {v!r}")
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{key}.{n}", f"must be > 0, got {v!r}")
    return DeviceProfile(name=d["name"], memory_bytes=int(d["memory_bytes"]), flops=float(d["flops"]),
                         host_link_bytes_per_s=float(d["host_link_bytes_per_s"]),
                         network_bytes_per_s=float(d["network_bytes_per_s"]))


def participant_profiles(cfg: "DevicesConfig", n: int, model_params: int, *,
                         bytes_per_param: float = 4) -> list[DeviceProfile]:
    """Profile of each of ``n`` participants.

    Explicit ``cfg.profiles`` (already in units of the model in use) are assigned round-robin
    and used as they are, **not scaled**; otherwise the named ``cfg.classes`` are assigned
    round-robin (participant p gets ``classes[p % len(classes)]``) and scaled to ``model_params``
    parameters of ``bytes_per_param`` bytes (:func:`scale_profile`).

    Raises:
        ConfigError: unknown class (key ``devices.classes``) or a bad explicit profile.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if cfg.assignment != "round_robin":
        raise ConfigError("devices.assignment", f"must be 'round_robin', got {cfg.assignment!r}")
    if cfg.profiles:
        pool = [profile_from_dict(p, f"devices.profiles[{i}]") for i, p in enumerate(cfg.profiles)]
    else:
        if not cfg.classes:
            raise ConfigError("devices.classes", "must name at least one device class (or give devices.profiles)")
        pool = []
        for name in cfg.classes:
            if name not in DEVICE_CLASSES:
                raise ConfigError("devices.classes", f"unknown device class {name!r}; known: {', '.join(DEVICE_CLASSES)}")
            pool.append(scale_profile(DEVICE_CLASSES[name], model_params, bytes_per_param=bytes_per_param))
    return [pool[p % len(pool)] for p in range(n)]
