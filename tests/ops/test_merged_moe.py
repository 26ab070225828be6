from __future__ import annotations

import pytest
import torch

import flux.ops as ops
from tests.conftest import backend_params
from tests.oracle import assert_close_to_oracle, naive_merged_moe


def _mapping(kind: str, num_experts: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """expert_to_group int32 [E] and G for a named layout."""
    if kind == "identity":
        return torch.arange(num_experts, dtype=torch.int32), num_experts
    if kind == "merged":  # several experts per group, one group left empty
        groups = max(2, num_experts // 3)
        e2g = torch.randint(0, groups - 1, (num_experts,), generator=gen, dtype=torch.int32)
        return e2g, groups
    if kind == "dropped":  # every third expert dropped
        e2g = torch.arange(num_experts, dtype=torch.int32)
        e2g[::3] = -1
        return e2g, num_experts
    raise ValueError(kind)


def _routing(kind: str, tokens: int, num_experts: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "one_expert":  # every token's first choice is expert 0
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)]) if tokens else torch.zeros(0, k, dtype=torch.long)
        if tokens:
            first = (ids == 0).long().argmax(1)
            has0 = (ids == 0).any(1)
            ids[torch.arange(tokens)[has0], first[has0]] = ids[has0, 0]
            ids[:, 0] = 0
        return ids
    if kind == "duplicates":  # slots may repeat an expert (and map to one group)
        return torch.randint(0, num_experts, (tokens, k), generator=gen)
    return torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)]) if tokens else torch.zeros(0, k, dtype=torch.long)


def _make(tokens, hidden, inter, num_experts, k, mapping, routing, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e2g, groups = _mapping(mapping, num_experts, gen)
    ids = _routing(routing, tokens, num_experts, k, gen).to(torch.int32)
    x = torch.randn(tokens, hidden, generator=gen)
    w = torch.rand(tokens, k, generator=gen)
    gate_up = torch.randn(groups, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(groups, hidden, inter, generator=gen) / inter**0.5
    grad_y = torch.randn(tokens, hidden, generator=gen)
    to = lambda t, dt=dtype: t.to(device=device, dtype=dt)  # noqa: E731
    return dict(x=to(x), ids=ids.to(device), w=to(w, torch.float32), gate_up=to(gate_up), down=to(down),
                e2g=e2g.to(device), grad_y=to(grad_y))


def _oracle(case, dtype, activation="silu"):
    """(y, grads) of the naive loop in ``dtype`` with autograd."""
    leaves = {n: case[n].detach().to(dtype).requires_grad_() for n in ("x", "w", "gate_up", "down")}
    y = naive_merged_moe(leaves["x"], case["ids"], leaves["w"], leaves["gate_up"], leaves["down"], case["e2g"], activation)
    y.backward(case["grad_y"].to(dtype))
    return y.detach(), {n: t.grad for n, t in leaves.items()}


def _flux(case, backend, use, activation="silu", split=None, frozen_second=False):
    x = case["x"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_()
    if split is None:
        gate_up = [case["gate_up"].clone().requires_grad_()]
        down = [case["down"].clone().requires_grad_()]
    else:  # two stacks: groups [0, split) and [split, G)
        gate_up = [case["gate_up"][:split].clone(), case["gate_up"][split:].clone()]
        down = [case["down"][:split].clone(), case["down"][split:].clone()]
        for stack in (gate_up, down):
            stack[0].requires_grad_()
            if not frozen_second:
                stack[1].requires_grad_()
    with use(backend):
        y = ops.merged_moe(x, case["ids"], w, gate_up, down, case["e2g"], activation=activation)
        y.backward(case["grad_y"])
    return y.detach(), x, w, gate_up, down


CASES = [
    # T, H, I, E, k, mapping, routing
    (33, 97, 47, 7, 2, "identity", "random"),  # odd sizes, prime E
    (16, 32, 16, 1, 1, "identity", "random"),  # E=1, k=1
    (12, 40, 24, 5, 5, "identity", "random"),  # k=E
    (0, 32, 16, 4, 2, "identity", "random"),  # T=0
    (40, 48, 32, 13, 3, "merged", "random"),  # merged groups, an empty group
    (40, 48, 32, 9, 4, "dropped", "random"),  # dropped experts
    (30, 32, 16, 6, 3, "merged", "duplicates"),  # duplicate groups and experts per token
    (50, 32, 24, 8, 2, "identity", "one_expert"),  # all tokens on expert 0
]


def _ids(cases):
    return [f"T{c[0]}-H{c[1]}-I{c[2]}-E{c[3]}-k{c[4]}-{c[5]}-{c[6]}" for c in cases]


def _compare(case, backend, device, dtype, use, activation="silu"):
    ref64, grads64 = _oracle(case, torch.float64, activation)
    ref_same, grads_same = _oracle(case, dtype, activation)
    y, x, w, gate_up, down = _flux(case, backend, use, activation)
    assert y.dtype == dtype and y.shape == case["x"].shape
    assert_close_to_oracle(y, ref_same, ref64, "y")
    assert_close_to_oracle(x.grad, grads_same["x"], grads64["x"], "grad x")
    assert_close_to_oracle(w.grad, grads_same["w"], grads64["w"], "grad topk_weights")
    assert_close_to_oracle(gate_up[0].grad, grads_same["gate_up"], grads64["gate_up"], "grad gate_up")
    assert_close_to_oracle(down[0].grad, grads_same["down"], grads64["down"], "grad down")


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda")))
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_merged_moe_fp32(backend, device, case, use):
    _compare(_make(*case, torch.float32, device), backend, device, torch.float32, use)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda")))
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]], ids=_ids([CASES[0], CASES[4], CASES[6]]))
def test_merged_moe_bf16(backend, device, case, use):
    _compare(_make(*case, torch.bfloat16, device), backend, device, torch.bfloat16, use)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda")))
def test_merged_moe_gelu(backend, device, use):
    _compare(_make(20, 32, 16, 5, 2, "merged", "random", torch.float32, device), backend, device, torch.float32, use, "gelu")


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda")))
def test_frozen_stack_gets_no_gradient(backend, device, use):
    case = _make(40, 48, 32, 10, 3, "merged", "duplicates", torch.float32, device)
    groups = case["gate_up"].shape[0]
    ref64, grads64 = _oracle(case, torch.float64)
    y, x, w, gate_up, down = _flux(case, backend, use, split=2, frozen_second=True)
    assert gate_up[1].grad is None and down[1].grad is None
    torch.testing.assert_close(y.double(), ref64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gate_up[0].grad.double(), grads64["gate_up"][:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(down[0].grad.double(), grads64["down"][:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), grads64["x"], rtol=1e-4, atol=1e-5)
    assert groups > 2


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda")))
def test_two_trainable_stacks_equal_one(backend, device, use):
    case = _make(24, 32, 16, 6, 2, "identity", "random", torch.float32, device)
    y1, *_, g1, d1 = _flux(case, backend, use)
    y2, *_, g2, d2 = _flux(case, backend, use, split=4)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(torch.cat([g.grad for g in g2]), g1[0].grad)
    torch.testing.assert_close(torch.cat([d.grad for d in d2]), d1[0].grad)


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda")))
def test_noncontiguous_incoming_gradient(backend, device, use):
    case = _make(20, 32, 16, 5, 2, "identity", "random", torch.float32, device)
    wide = torch.randn(20, 64, device=device)
    case["grad_y"] = wide[:, ::2]  # strided view
    assert not case["grad_y"].is_contiguous()
    ref64, grads64 = _oracle(case, torch.float64)
    _, x, w, gate_up, _ = _flux(case, backend, use)
    torch.testing.assert_close(x.grad.double(), grads64["x"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), grads64["w"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gate_up[0].grad.double(), grads64["gate_up"], rtol=1e-4, atol=1e-5)


def test_duplicate_group_runs_once_with_summed_weight(use):
    # Experts 0 and 1 share group 0: running it once with w0 + w1 equals running it twice.
    x = torch.randn(3, 8)
    gate_up = torch.randn(1, 6, 8)
    down = torch.randn(1, 8, 3)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]], dtype=torch.int32)
    w = torch.tensor([[0.25, 0.5], [1.0, 2.0], [0.0, 0.0]])
    e2g = torch.tensor([0, 0], dtype=torch.int32)
    with use("cpp"):
        y = ops.merged_moe(x, ids, w, gate_up, down, e2g)
    single = naive_merged_moe(x, ids[:, :1], w.sum(1, keepdim=True), gate_up, down, e2g)
    torch.testing.assert_close(y, single)
    assert y[2].abs().max() == 0


def test_quantized_frozen_stack_equals_its_dequantized_weights(use):
    case = _make(30, 64, 32, 6, 2, "merged", "random", torch.float32, "cpu")
    q_gate_up, q_down = ops.quantize(case["gate_up"], 4, 32), ops.quantize(case["down"], 4, 32)
    with use("cpp"):
        y_q = ops.merged_moe(case["x"], case["ids"], case["w"], q_gate_up, q_down, case["e2g"])
        y_d = ops.merged_moe(case["x"], case["ids"], case["w"], q_gate_up.dequantize(), q_down.dequantize(), case["e2g"])
    torch.testing.assert_close(y_q, y_d)


BAD = {
    "id out of range": (dict(ids=torch.tensor([[0, 9]], dtype=torch.int32)), IndexError, "topk_ids"),
    "negative id": (dict(ids=torch.tensor([[0, -1]], dtype=torch.int32)), IndexError, "topk_ids"),
    "group out of range": (dict(e2g=torch.tensor([0, 1, 5, 0], dtype=torch.int32)), IndexError, "expert_to_group"),
    "group below -1": (dict(e2g=torch.tensor([0, -2, 1, 0], dtype=torch.int32)), IndexError, "expert_to_group"),
    "float ids": (dict(ids=torch.zeros(1, 2)), TypeError, "topk_ids"),
    "weights shape": (dict(w=torch.ones(1, 3)), ValueError, "topk_weights"),
    "ids rows": (dict(ids=torch.zeros(2, 2, dtype=torch.int32), w=torch.ones(2, 2)), ValueError, "topk_ids"),
    "hidden mismatch": (dict(gate_up=torch.randn(2, 6, 9)), ValueError, "gate_up"),
    "down mismatch": (dict(down=torch.randn(2, 8, 4)), ValueError, "down"),
    "group count mismatch": (dict(down=torch.randn(3, 8, 3)), ValueError, "down"),
    "dtype mismatch": (dict(gate_up=torch.randn(2, 6, 8, dtype=torch.float64)), TypeError, "gate_up"),
    "non-contiguous weights": (dict(gate_up=torch.randn(2, 8, 6).transpose(1, 2)), ValueError, "contiguous"),
    "odd 2I": (dict(gate_up=torch.randn(2, 5, 8)), ValueError, "2I"),
    "activation": (dict(activation="relu"), ValueError, "activation"),
    "stack count": (dict(down=[torch.randn(1, 8, 3), torch.randn(1, 8, 3)]), ValueError, "stacks"),
}


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_clear_error(name, backend, use):
    args = dict(x=torch.randn(1, 8), ids=torch.tensor([[0, 3]], dtype=torch.int32), w=torch.ones(1, 2),
                gate_up=torch.randn(2, 6, 8), down=torch.randn(2, 8, 3), e2g=torch.tensor([0, 1, 1, 0], dtype=torch.int32),
                activation="silu")
    override, exc, match = BAD[name]
    args.update(override)
    with use(backend), pytest.raises(exc, match=match):
        ops.merged_moe(args["x"], args["ids"], args["w"], args["gate_up"], args["down"], args["e2g"], activation=args["activation"])


def test_native_routing_rejects_out_of_range_ids_itself():
    # The C++ kernel checks bounds on its own (it must never read out of bounds), not only the wrapper.
    import flux._C  # noqa: F401

    ids = torch.tensor([[0, 7]], dtype=torch.int32)
    with pytest.raises(IndexError, match="topk_ids"):
        torch.ops.flux_C.moe_routing(ids, torch.zeros(4, dtype=torch.int32), 1)
    with pytest.raises(IndexError, match="expert_to_group"):
        torch.ops.flux_C.moe_routing(torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3], dtype=torch.int32), 2)


# The triton backend uses the reference routing builder, so it is covered as "reference".
@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda"), exclude=("triton",)))
def test_routing_metadata_matches_contract(backend, device, use):
    from flux.ops.backends import reference

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 9, (25, 4), generator=gen, dtype=torch.int32).to(device)
    e2g = torch.tensor([0, 2, -1, 1, 2, 0, -1, 3, 1], dtype=torch.int32, device=device)
    expect = reference.moe_routing(ids, e2g, 5)
    with use(backend):
        _, impl = ops.resolve("moe_routing", device)
        got = impl.moe_routing(ids, e2g, 5)
    for a, b in zip(got, expect):
        assert torch.equal(a.cpu(), b.cpu())
    offsets, sorted_slot, pair_of_slot = (t.cpu().long() for t in expect)
    # hand-check the contract on the reference result
    groups = e2g.cpu().long()[ids.cpu().long()]
    assert offsets[-1] == sum(len({g for g in row if g >= 0}) for row in groups.tolist())
    for p in range(int(offsets[-1])):
        t, j = divmod(int(sorted_slot[p]), 4)
        g = int(groups[t, j])
        assert offsets[g] <= p < offsets[g + 1]
        assert pair_of_slot[t, j] == p
