"""route_profile microbenchmarks: every router shape x gate format x provider (the unfused torch
chain and each flux backend).  Each flux provider's ids and weights are checked against the
unfused chain (a near-tie may flip an id between equal-up-to-rounding logits)."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from benchmarks.conftest import device_marks, run_benchmark, skip_provider
from benchmarks.providers import Skip, build_route, rel_err, route_providers
from benchmarks.shapes import GATES, cached_route_case, route_shapes

DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def _params():
    params = []
    for device, size in (("cpu", "cpu"), ("cuda", "full")):
        for shape in route_shapes(size):
            for gate in GATES:
                for provider in route_providers(device):
                    params.append(pytest.param(device, shape.name, gate, provider,
                                               id=f"{shape.name}-{gate}-{provider}", marks=device_marks(device)))
    return params


@lru_cache(maxsize=1)
def _expected(device: str, shape: str, gate: str):
    case = cached_route_case(shape, gate, DTYPES[device], device)
    bench = build_route("unfused", case)
    return bench.results(bench.fn())


@pytest.mark.parametrize("device,shape,gate,provider", _params())
def test_route_profile(benchmark, device, shape, gate, provider):
    case = cached_route_case(shape, gate, DTYPES[device], device)
    try:
        bench = build_route(provider, case)
    except Skip as why:
        skip_provider(provider, device, str(why))
    out = run_benchmark(benchmark, bench.fn, device, f"route_profile {shape} {gate}",
                        bytes=bench.bytes, flops=bench.flops, provider=provider)
    got = bench.results(out)
    s = case.shape
    assert got["topk_ids"].shape == (s.T, s.k) and got["topk_ids"].dtype == torch.int32
    assert got["topk_weights"].shape == (s.T, s.k) and got["topk_weights"].dtype == torch.float32
    if provider.startswith("flux:"):
        ref = _expected(device, shape, gate)
        same = (got["topk_ids"].sort(dim=1).values == ref["topk_ids"].sort(dim=1).values).all(dim=1)
        assert same.float().mean() >= 0.999, f"{provider}: {1 - same.float().mean():.2%} of tokens routed differently"
        err = rel_err(got["topk_weights"][same].sort(dim=1).values, ref["topk_weights"][same].sort(dim=1).values)
        assert err <= (1e-4 if case.dtype == torch.float32 else 1e-2), f"{provider}: weights relative error {err:.2e}"
