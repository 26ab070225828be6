"""Registration, dispatch and packaging: opcheck, torch.compile, backend selection, env report."""
import os
import subprocess
import sys

import pytest
import torch

import flux
import flux.ops as ops
from flux.ops import library


def test_compiled_extension_is_built_and_selected():
    # CI must fail when flux._C is missing: no silent fallback to the reference backend.
    state = ops.availability()
    assert state["cpp"] == "available", state["cpp"]
    assert ops.resolve("merged_moe_fwd", "cpu")[0] == "cpp"
    assert ops.resolve("route_profile", "cpu")[0] == "cpp"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flux_C::merged_moe_fwd", "CPU")


def test_triton_backend_available_under_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    assert ops.availability()["triton"] == "available"


def test_forced_backend_that_cannot_run_raises():
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        ops.route_profile(torch.randn(2, 4), torch.randn(3, 4), 1)
    with pytest.raises(ValueError, match="not one of"):
        with ops.use_backend("fast"):
            pass


def test_env_variable_selects_backend():
    code = "import torch, flux.ops as o; print(o.resolve('merged_moe_fwd', 'cpu')[0])"
    env = dict(os.environ, FLUX_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_env_report_lists_backends():
    report = flux.env_report()
    for name in ("reference", "cpp", "cuda", "triton", "torch", "triton"):
        assert name in report
    out = subprocess.run([sys.executable, "-m", "flux.env"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout


def test_import_without_triton():
    # flux must import and run its CPU kernels when Triton is absent.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, flux.ops as o\n"
        "assert o.availability()['triton'].startswith('triton is not installed'), o.availability()\n"
        "print(o.route_profile(torch.randn(3, 4), torch.randn(2, 4), 1)[1].shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([3, 1])" in out.stdout


def _moe_args(tokens=9, hidden=16, inter=8, experts=4, k=2, grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g, requires_grad=grad)
    ids = torch.randint(0, experts, (tokens, k), generator=g, dtype=torch.int32)
    w = torch.rand(tokens, k, generator=g, requires_grad=grad)
    gate_up = torch.randn(3, 2 * inter, hidden, generator=g, requires_grad=grad)
    down = torch.randn(3, hidden, inter, generator=g, requires_grad=grad)
    e2g = torch.tensor([0, 1, 2, 1][:experts], dtype=torch.int32)
    return x, ids, w, gate_up, down, e2g


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck_merged_moe(backend):
    x, ids, w, gate_up, down, e2g = _moe_args(grad=True)
    with ops.use_backend(backend):
        torch.library.opcheck(library.merged_moe_fwd, (x, ids, w, [gate_up], [down], e2g, "silu"))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck_route_profile_and_quantize(backend):
    x = torch.randn(10, 64)
    gate = torch.randn(6, 64)
    with ops.use_backend(backend):
        q = ops.quantize(gate, 4, 32)
        counts = torch.zeros(6, dtype=torch.int64)
        torch.library.opcheck(library.route_profile_op, (x, q.qdata, q.scales, 4, 32, 2, "softmax", False, counts))
        torch.library.opcheck(library.quantize_rows, (gate, 4, 32))
        torch.library.opcheck(library.dequantize_rows, (q.qdata, q.scales, 4, 32, 64, torch.float32))


def test_torch_compile_fullgraph_traces_the_ops():
    x, ids, w, gate_up, down, e2g = _moe_args(grad=True)
    gate = torch.randn(4, 16)

    def block(x, gate, gate_up, down):
        weights, ids, counts = ops.route_profile(x, gate, 2)
        return ops.merged_moe(x, ids, weights, gate_up, down, e2g), counts

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y, counts = compiled(x, gate, gate_up, down)
    y_eager, counts_eager = block(x, gate, gate_up, down)
    torch.testing.assert_close(y, y_eager)
    assert torch.equal(counts, counts_eager)
    (y * y).sum().backward()
    assert gate_up.grad is not None and x.grad is not None
