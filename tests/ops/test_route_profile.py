import pytest
import torch

import flux.ops as ops
from tests.conftest import backend_params
from tests.oracle import naive_route

# (T, H, E, k): odd sizes, E=1, prime E, k=1, k=E, T=0.
CASES = [(37, 97, 7, 2), (16, 64, 1, 1), (24, 48, 13, 13), (0, 32, 5, 3), (64, 128, 64, 8)]


def _gate(kind: str, num_experts: int, hidden: int, device: str):
    dense = torch.randn(num_experts, hidden, device=device) / hidden**0.5
    if kind == "dense":
        return dense, dense
    q = ops.quantize(dense, bits=int(kind[3:]), group_size=32)
    return q, q.dequantize(torch.float32)


def _check_routing(weights, ids, counts0, counts, x, gate_dense, top_k, scoring, renormalize, tol):
    logits, scores = naive_route(x, gate_dense, top_k, scoring, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and counts.dtype == torch.int64
    assert ids.shape == weights.shape == (x.shape[0], top_k)
    if x.shape[0]:
        # The chosen logits are the top-k values in descending order; ids differ from the fp64
        # ranking only where two logits are within rounding of each other.
        best = logits.sort(dim=-1, descending=True).values[:, :top_k]
        chosen = logits.gather(1, ids.long())
        torch.testing.assert_close(chosen, best, atol=tol, rtol=0)
        assert (ids.long().unsqueeze(2) != ids.long().unsqueeze(1)).sum() == x.shape[0] * top_k * (top_k - 1)
        expect_w = scores.gather(1, ids.long())
        if renormalize:
            expect_w = expect_w / expect_w.sum(-1, keepdim=True)
        torch.testing.assert_close(weights.double(), expect_w, atol=tol, rtol=tol)
    hist = torch.bincount(ids.flatten().long(), minlength=gate_dense.shape[0])
    assert torch.equal(counts - counts0, hist)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda")))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gate_kind", ["dense", "int8", "int4"])
@pytest.mark.parametrize("scoring,renormalize", [("softmax", False), ("sigmoid", True), ("softmax", True)])
def test_route_profile_against_fp64(backend, device, case, gate_kind, scoring, renormalize, use):
    tokens, hidden, num_experts, top_k = case
    torch.manual_seed(1)
    x = torch.randn(tokens, hidden, device=device)
    gate, gate_dense = _gate(gate_kind, num_experts, hidden, device)
    counts = torch.randint(0, 5, (num_experts,), device=device)
    counts0 = counts.clone()
    with use(backend):
        weights, ids, out_counts = ops.route_profile(x, gate, top_k, scoring=scoring, renormalize=renormalize, counts=counts)
    assert out_counts is counts  # accumulated in place
    _check_routing(weights, ids, counts0, counts, x, gate_dense, top_k, scoring, renormalize, tol=1e-4)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda")))
def test_route_profile_bf16_input(backend, device, use):
    torch.manual_seed(2)
    x = torch.randn(40, 96, device=device).bfloat16()
    gate, gate_dense = _gate("int4", 12, 96, device)
    with use(backend):
        weights, ids, counts = ops.route_profile(x, gate, 3)
    # logits are computed in fp32 from the bf16 values: compare against fp64 of the same values
    _check_routing(weights, ids, torch.zeros_like(counts), counts, x.float(), gate_dense, 3, "softmax", False, tol=1e-4)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda")))
def test_ties_go_to_lower_index(backend, device, use):
    # Integer data makes the logits exact, so ties are real: experts 1, 3, 4 share a row.
    gate = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 0.0], [2.0, 1.0], [2.0, 1.0], [1.0, 1.0]], device=device)
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0]], device=device)
    with use(backend):
        weights, ids, counts = ops.route_profile(x, gate, 4)
    assert ids.tolist() == [[1, 3, 4, 5], [0, 1, 2, 3]]
    assert counts.tolist() == [1, 2, 1, 2, 1, 1]
    torch.testing.assert_close(weights[1], torch.full((4,), 1 / 6, device=device))


def test_counts_accumulate_over_calls(use):
    x = torch.randn(50, 32)
    gate = torch.randn(6, 32)
    with use("cpp"):
        _, ids1, counts = ops.route_profile(x[:20], gate, 2)
        _, ids2, counts = ops.route_profile(x[20:], gate, 2, counts=counts)
    assert torch.equal(counts, torch.bincount(torch.cat((ids1, ids2)).flatten().long(), minlength=6))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(5, 9), 2, {}), ValueError, "hidden size"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8), 6, {}), ValueError, "top_k"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8), 0, {}), ValueError, "top_k"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8), 2, {"scoring": "relu"}), ValueError, "scoring"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8), 2, {"counts": torch.zeros(4, dtype=torch.int64)}), ValueError, "counts"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8), 2, {"counts": torch.zeros(5)}), TypeError, "counts"),
        (lambda: (torch.randn(4, 8, 2), torch.randn(5, 8), 2, {}), ValueError, "x must be"),
        (lambda: (torch.ones(4, 8, dtype=torch.int64), torch.randn(5, 8), 2, {}), TypeError, "x must be floating"),
    ],
)
def test_route_profile_bad_input(make, exc, match):
    x, gate, top_k, kwargs = make()
    with pytest.raises(exc, match=match):
        ops.route_profile(x, gate, top_k, **kwargs)
