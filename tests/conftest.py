"""Shared fixtures.  Triton kernels run on CPU only when TRITON_INTERPRET=1 is set before they are
defined, so it is set here, before flux (and flux_kernels, imported lazily) is imported."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flux.ops  # noqa: E402
from flux.ops.backends import availability  # noqa: E402

CPU_BACKENDS = ("reference", "cpp", "triton")
GPU_BACKENDS = ("reference", "cuda", "triton")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: scripts/gpu_session.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def backend_params(devices=("cpu",), exclude=()):
    """(backend, device) pairs: CPU backends always; CUDA ones under the `gpu` marker.
    An unavailable CPU backend is a failure (the extension and Triton are part of the install).
    ``exclude`` names backends that have no kernel of their own for the op under test."""
    params = []
    if "cpu" in devices:
        for name in (b for b in CPU_BACKENDS if b not in exclude):
            marks = [pytest.mark.triton] if name == "triton" else []
            params.append(pytest.param(name, "cpu", id=f"{name}-cpu", marks=marks))
    if "cuda" in devices:
        for name in (b for b in GPU_BACKENDS if b not in exclude):
            params.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=[pytest.mark.gpu]))
    return params


@pytest.fixture
def use(request):
    """Context manager forcing a backend; fails loudly if that backend is unavailable."""

    def _use(name: str):
        state = availability()[name]
        assert state == "available", f"backend {name} unavailable: {state}"
        return flux.ops.use_backend(name)

    return _use
