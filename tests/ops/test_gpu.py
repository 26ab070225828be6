"""GPU-only checks (run with `pytest -m gpu` on a CUDA machine; scripts/gpu_session.sh)."""
import pytest
import torch

import flux.ops as ops

pytestmark = pytest.mark.gpu


def _case(tokens, hidden, inter, experts, k, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype, generator=g)
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    w, ids = logits.softmax(-1).topk(k)
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=dtype, generator=g) / hidden**0.5
    down = torch.randn(experts, hidden, inter, device="cuda", dtype=dtype, generator=g) / inter**0.5
    e2g = torch.arange(experts, dtype=torch.int32, device="cuda")
    return x, ids.int(), w, gate_up, down, e2g


def test_cuda_graph_capture_merged_moe_and_route_profile():
    # Capture fails on any host synchronisation inside the ops.
    x, ids, w, gate_up, down, e2g = _case(256, 256, 128, 16, 4)
    gate = ops.quantize(torch.randn(16, 256, device="cuda"), 4, 64)
    counts = torch.zeros(16, dtype=torch.int64, device="cuda")
    ops.merged_moe(x, ids, w, gate_up, down, e2g)  # warm-up: compile kernels outside the capture
    ops.route_profile(x, gate, 4, counts=counts)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.merged_moe(x, ids, w, gate_up, down, e2g)
        rw, rids, _ = ops.route_profile(x, gate, 4, counts=counts)
    counts.zero_()
    graph.replay()
    torch.cuda.synchronize()
    with ops.use_backend("reference"):
        y_ref = ops.merged_moe(x, ids, w, gate_up, down, e2g)
        _, ids_ref, counts_ref = ops.route_profile(x, gate, 4)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(counts, counts_ref)


def test_offsets_beyond_int32():
    # T*k*H > 2^31 elements in the per-pair buffers: 64-bit index arithmetic is required.
    tokens, hidden, k = (1 << 31) // (4096 * 4) + 64, 4096, 4
    x, ids, w, gate_up, down, e2g = _case(tokens, hidden, 64, 8, k)
    y = ops.merged_moe(x, ids, w, gate_up, down, e2g)
    rows = torch.arange(tokens - 32, tokens, device="cuda")
    with ops.use_backend("reference"):
        y_tail = ops.merged_moe(x[rows], ids[rows], w[rows], gate_up, down, e2g)
    torch.testing.assert_close(y[rows].float(), y_tail.float(), rtol=2e-2, atol=2e-2)
    gate = torch.randn(8, hidden, device="cuda")
    _, got_ids, counts = ops.route_profile(x, gate, 2)
    assert int(counts.sum()) == tokens * 2


def test_torch_compile_on_cuda():
    x, ids, w, gate_up, down, e2g = _case(64, 128, 64, 8, 2)
    fn = torch.compile(lambda *a: ops.merged_moe(*a), fullgraph=True)
    torch.testing.assert_close(fn(x, ids, w, gate_up, down, e2g), ops.merged_moe(x, ids, w, gate_up, down, e2g))
