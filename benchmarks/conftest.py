"""pytest set-up of the kernel microbenchmarks.

    pytest benchmarks/ --benchmark-only        # time every case (pytest-benchmark)
    pytest benchmarks/ --benchmark-disable     # smoke: every provider once, outputs checked

``FLUX_BENCH_THREADS=N`` sets torch's thread count.  A flux backend that cannot run here is
skipped with the reason; with ``FLUX_REQUIRE_EXTENSION=1`` (the test command) an unbuilt
``flux._C`` fails the cpp cases instead, like the rest of the suite.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.timing import sync

if os.environ.get("FLUX_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FLUX_BENCH_THREADS"]))

HAS_CUDA = torch.cuda.is_available()
# Native backends that are part of the install on each device.
NATIVE = {"cpu": ("cpp",), "cuda": ("cuda",)}


def device_marks(device: str) -> list:
    """Marks for a case on ``device``: CUDA cases carry the gpu marker and skip without a GPU."""
    if device == "cuda":
        return [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
    return []


def skip_provider(provider: str, device: str, reason: str) -> None:
    """Skip a provider that cannot run here; fail instead when the extension is required."""
    backend = provider.split(":", 1)[1] if provider.startswith("flux:") else None
    required = os.environ.get("FLUX_REQUIRE_EXTENSION", "0") == "1"
    if required and backend in NATIVE.get(device, ()) and "not built" in reason:
        pytest.fail(f"FLUX_REQUIRE_EXTENSION=1 but {provider} is unavailable: {reason}")
    pytest.skip(f"{provider}: {reason}")


def run_benchmark(benchmark, fn, device: str, group: str, **extra):
    """Time ``fn`` with pytest-benchmark (device work included); returns fn's last result and
    records GFLOP/s (``flops=``) or GB/s (``bytes=``) in the benchmark's extra_info."""
    benchmark.group = group
    benchmark.extra_info.update({k: v for k, v in extra.items() if v is not None})

    def call():
        out = fn()
        sync(device)
        return out

    result = benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if benchmark.enabled and stats is not None:
        median = stats.stats.median
        if extra.get("flops"):
            benchmark.extra_info["gflops"] = extra["flops"] / median / 1e9
        if extra.get("bytes"):
            benchmark.extra_info["gbps"] = extra["bytes"] / median / 1e9
    return result
