"""Direct check of ``torch.ops.flux_C`` on CUDA tensors against the reference (on CPU, in fp64
where the op computes): fresh random inputs, outputs compared exactly where the contract is
exact, then CUDA-graph capture of the routing ops.

GPU only (``pytest -m gpu``); ``scripts/gpu_session.sh check`` runs this file and reports its
cases in ``session.json`` (``kernel_check``).  Nothing CUDA-only is touched at import time.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from flux.ops.backends import reference as R

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(scope="module")
def C():
    """``torch.ops.flux_C``, asserted to have its CUDA kernels."""
    from flux._extension import has_cuda_kernels, load

    ok, why = load()
    assert ok, why
    assert has_cuda_kernels(), "flux._C was built without its CUDA kernels"
    return torch.ops.flux_C


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: fresh inputs per case, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------- quantize / dequantize

QUANTIZE_SHAPES = [(1, 1, 1), (7, 97, 16), (33, 130, 64), (5, 64, 3), (3, 5, 7), (64, 4096, 128)]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dt", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols,gs", QUANTIZE_SHAPES, ids=[f"{r}x{c}-gs={g}" for r, c, g in QUANTIZE_SHAPES])
@pytest.mark.parametrize("bits", (4, 8))
def test_quantize_dequantize_bit_exact(C, gen, bits, rows, cols, gs, dt):
    w = torch.randn(rows, cols, generator=gen).to(dt)
    w[0, : min(gs, cols)] = 0
    errors = []
    q, s = C.quantize(w.to(DEV), bits, gs)
    qr, sr = R.quantize(w, bits, gs)
    if not (torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)):
        errors.append(f"qdata mismatches {(q.cpu() != qr).sum().item()}, scales max diff "
                      f"{(s.cpu() - sr).abs().max().item() if s.numel() else 0}")
    for out_dt in (torch.float32, dt, torch.float64):
        d = C.dequantize(q, s, bits, gs, cols, out_dt)
        dr = R.dequantize(qr, sr, bits, gs, cols, out_dt)
        if not torch.equal(d.cpu(), dr):
            errors.append(f"dequantize->{out_dt} mismatch")
    assert not errors, errors


# ---------------------------------------------------------------- route_profile

ROUTE_EXPERTS = [(1, 1), (6, 4), (7, 2), (8, 8), (9, 3), (13, 13), (32, 4), (33, 5), (64, 8), (100, 6),
                 (128, 8), (200, 17), (256, 8), (256, 256)]


def _route_cases() -> list:
    """(T, H, E, k, x dtype, gate kind, scoring, renormalize, group size) of every case."""
    cases = []
    for E, k in ROUTE_EXPERTS:
        for gate_kind in ("f32", "int4", "int8"):
            cases.append((37, 97, E, k, torch.float32, gate_kind, "softmax", False, 32))
        cases.append((130, 256, E, k, torch.bfloat16, "bf16", "sigmoid", True, 32))
        cases.append((65, 64, E, k, torch.float16, "int4", "softmax", True, 16))
    cases.append((0, 32, 5, 3, torch.float32, "f32", "softmax", False, 32))
    return [pytest.param(*c, id=f"T={c[0]}-H={c[1]}-E={c[2]}-k={c[3]}-x={c[4]}-gate={c[5]}-{c[6]}-renorm={c[7]}"
                                f"-gs={c[8]}") for c in cases]


@pytest.mark.parametrize("T,H,E,k,xdt,gate_kind,scoring,renorm,gs", _route_cases())
def test_route_profile_against_fp64_logits(C, gen, T, H, E, k, xdt, gate_kind, scoring, renorm, gs):
    x = torch.randn(T, H, generator=gen).to(xdt)
    dense = torch.randn(E, H, generator=gen) / H**0.5
    if gate_kind.startswith("int"):
        bits = int(gate_kind[3:])
        qg, sg = R.quantize(dense, bits, gs)
        w = R.dequantize(qg, sg, bits, gs, H, torch.float32)
        args = (qg.to(DEV), sg.to(DEV), bits, gs)
    else:
        gdt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[gate_kind]
        g = dense.to(gdt)
        w = g.float()
        args = (g.to(DEV), None, 0, 1)
    counts0 = torch.randint(0, 5, (E,), generator=gen)
    counts = counts0.clone().to(DEV)
    weights, ids = C.route_profile(x.to(DEV), *args, k, scoring, renorm, counts)
    torch.cuda.synchronize()
    weights, ids, counts = weights.cpu(), ids.cpu(), counts.cpu()
    logits = x.double() @ w.double().t()
    if T:
        best = logits.sort(dim=-1, descending=True).values[:, :k]
        chosen = logits.gather(1, ids.long().clamp(0, E - 1))
        assert ids.min() >= 0 and ids.max() < E, "ids out of range"
        assert (chosen - best).abs().max() <= 1e-4, f"chosen logits off by {(chosen - best).abs().max().item():.3g}"
        if k > 1:
            assert (ids.long().unsqueeze(2) == ids.long().unsqueeze(1)).sum() == T * k, "duplicate ids in a row"
        scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
        expect = scores.gather(1, ids.long())
        if renorm:
            expect = expect / expect.sum(-1, keepdim=True)
        err = (weights.double() - expect).abs().max().item()
        assert err <= 1e-4, f"weights off by {err:.3g}"
    hist = torch.bincount(ids.flatten().long(), minlength=E)
    assert torch.equal(counts - counts0, hist), "counts mismatch"


def test_route_profile_exact_ties_lower_index_wins(C):
    gate = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 0.0], [2.0, 1.0], [2.0, 1.0], [1.0, 1.0]], device=DEV)
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0]], device=DEV)
    cnt = torch.zeros(6, dtype=torch.int64, device=DEV)
    _, ids = C.route_profile(x, gate, None, 0, 1, 4, "softmax", False, cnt)
    assert ids.tolist() == [[1, 3, 4, 5], [0, 1, 2, 3]] and cnt.tolist() == [1, 2, 1, 2, 1, 1], \
        f"{ids.tolist()} {cnt.tolist()}"


# ---------------------------------------------------------------- moe_routing

ROUTING_SHAPES = [(0, 4, 2, 3), (1, 1, 1, 1), (17, 8, 3, 2), (64, 16, 16, 5), (300, 64, 8, 64),
                  (1000, 64, 8, 7), (4097, 128, 8, 100), (20000, 256, 8, 256), (5000, 32, 4, 1)]


def _routing_cases() -> list:
    """(T, E, k, G, id dtype, drop fraction, out of range) of every case."""
    cases = []
    for T, E, k, G in ROUTING_SHAPES:
        for id_dtype in (torch.int32, torch.int64):
            cases.append((T, E, k, G, id_dtype, 0.2, False))
        cases.append((T, E, k, G, torch.int64, 0.2, True))
    cases.append((100, 8, 4, 3, torch.int32, 1.0, False))
    return [pytest.param(*c, id=f"T={c[0]}-E={c[1]}-k={c[2]}-G={c[3]}-{c[4]}-drop={c[5]}-oor={c[6]}")
            for c in cases]


@pytest.mark.parametrize("T,E,k,G,id_dtype,drop,out_of_range", _routing_cases())
def test_moe_routing_exact(C, gen, T, E, k, G, id_dtype, drop, out_of_range):
    ids = (torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T
           else torch.zeros(0, k, dtype=torch.long))
    e2g = torch.randint(0, G, (E,), generator=gen, dtype=torch.int32)
    e2g[torch.rand(E, generator=gen) < drop] = -1
    ids_dev = ids.clone()
    e2g_dev = e2g.clone()
    if out_of_range and T:
        # Out-of-range ids / groups must act as dropped (no crash, no out-of-bounds read).
        ids_dev[0, 0] = E + 1000
        ids_dev[-1, -1] = -3
        ids = ids.clone()
        ids[0, 0] = E
        ids[-1, -1] = E  # expert E (appended) is dropped
        e2g_dev[0] = G + 7
        e2g = torch.cat((e2g, torch.tensor([-1], dtype=torch.int32)))
        e2g[0] = -1
    ref = R.moe_routing(ids, e2g, G)
    got = C.moe_routing(ids_dev.to(id_dtype).to(DEV), e2g_dev.to(DEV), G)
    for name, a, b in zip(("group_offsets", "sorted_slot", "pair_of_slot"), got, ref):
        assert torch.equal(a.cpu(), b), f"{name} differs"


# ---------------------------------------------------------------- CUDA graphs

def test_cuda_graph_capture_of_routing_ops(C):
    # Capture fails on any host synchronisation.
    ids = torch.randint(0, 64, (2048, 8), device=DEV, dtype=torch.int32)
    e2g = torch.arange(64, device=DEV, dtype=torch.int32) % 40
    x = torch.randn(2048, 512, device=DEV, dtype=torch.bfloat16)
    qg, sg = C.quantize(torch.randn(64, 512, device=DEV), 4, 64)
    cnt = torch.zeros(64, dtype=torch.int64, device=DEV)
    C.moe_routing(ids, e2g, 40)
    C.route_profile(x, qg, sg, 4, 64, 8, "softmax", False, cnt)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = C.moe_routing(ids, e2g, 40)
        rw, rid = C.route_profile(x, qg, sg, 4, 64, 8, "softmax", False, cnt)  # noqa: F841 (kept alive)
    cnt.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = C.moe_routing(ids, e2g, 40)
    assert all(torch.equal(a, b) for a, b in zip(out, ref)), "moe_routing replay differs"
    assert int(cnt.sum()) == 2048 * 8, "route_profile counts after replay"
