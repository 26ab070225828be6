"""merged_moe microbenchmarks: every shape of the registry x routing x pass x provider.

CPU variants run in fp32 on CPU; the full-size shapes run in bf16 under the ``gpu`` marker.
Besides timing, each flux provider's output (and, in fwd+bwd, its gradients) is checked
against transformers' grouped_mm path over the same (merged) weights.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from benchmarks.conftest import device_marks, run_benchmark, skip_provider
from benchmarks.providers import Skip, build_moe, rel_err, moe_expected, moe_providers
from benchmarks.shapes import PASSES, ROUTINGS, cached_moe_case, moe_shapes

# (device, dtype, relative tolerance of outputs and gradients against the fp32 expectation)
SETTINGS = {"cpu": (torch.float32, 1e-4), "cuda": (torch.bfloat16, 3e-2)}


def _params():
    params = []
    for device, size in (("cpu", "cpu"), ("cuda", "full")):
        for shape in moe_shapes(size):
            for routing in ROUTINGS:
                for pass_ in PASSES:
                    for provider in moe_providers(device):
                        params.append(pytest.param(
                            device, shape.name, routing, pass_, provider,
                            id=f"{shape.name}-{routing}-{pass_}-{provider}", marks=device_marks(device)))
    return params


@lru_cache(maxsize=1)
def _expected(device: str, shape: str, routing: str, pass_: str) -> dict[str, torch.Tensor]:
    dtype, _ = SETTINGS[device]
    return moe_expected(cached_moe_case(shape, routing, dtype, device), pass_)


@pytest.mark.parametrize("device,shape,routing,pass_,provider", _params())
def test_merged_moe(benchmark, device, shape, routing, pass_, provider):
    dtype, tol = SETTINGS[device]
    case = cached_moe_case(shape, routing, dtype, device)
    try:
        bench = build_moe(provider, case, pass_)
    except Skip as why:
        skip_provider(provider, device, str(why))
    y = run_benchmark(
        benchmark, bench.fn, device, f"merged_moe {shape} {routing} {pass_}",
        flops=bench.flops, provider=provider, routing_stats=case.routing.stats,
    )
    rows = case.shape.T * case.shape.k if provider == "floor" else case.shape.T  # the floor's MLP runs T*k rows
    assert y.shape == (rows, case.shape.H) and y.dtype == dtype
    # flux computes the merged layer; the unmerged baselines match it when nothing is merged.
    if provider.startswith("flux:") or (provider in ("loop", "grouped_mm") and not case.merged):
        got = bench.results(y)
        for name, ref in _expected(device, shape, routing, pass_).items():
            assert got[name] is not None, f"{provider}: {name} was not computed"
            err = rel_err(got[name], ref)
            assert err <= tol, f"{provider} {name}: relative error {err:.2e} > {tol:g}"
    if provider.startswith("flux:") and pass_ == "fwd+bwd" and case.merged:
        assert case.stacks_gate_up[1].grad is None, "the frozen stack must get no gradient"
