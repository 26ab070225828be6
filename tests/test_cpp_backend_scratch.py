# Scratch comparisons of the cpp backend against the reference (deleted before hand-off).
import pytest
import torch
import flux  # noqa
import flux._C  # noqa
from flux.ops.backends import reference as R

C = torch.ops.flux_C
DT = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,gs", [((7, 97), 16), ((3, 1), 1), ((5, 64), 64), ((4, 130), 64), ((0, 8), 4), ((6, 33), 7)])
def test_quant(dtype, bits, shape, gs):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 3).to(dtype)
    if shape[0]:
        w[0, : min(gs, shape[1])] = 0
        # exact half-way values
        if shape[1] >= 4:
            w[-1, :4] = torch.tensor([7.0, 0.5, 1.5, -2.5])
    rq, rs = R.quantize(w, bits, gs)
    q, s = C.quantize(w, bits, gs)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    for odt in DT:
        if shape[0] == 0:
            assert C.dequantize(q, s, bits, gs, shape[1], odt).shape == shape
            continue
        rd = R.dequantize(rq, rs, bits, gs, shape[1], odt)
        d = C.dequantize(q, s, bits, gs, shape[1], odt)
        assert d.dtype == odt and torch.equal(d, rd)


@pytest.mark.parametrize("T,H,E,k", [(37, 97, 7, 2), (16, 64, 1, 1), (24, 48, 13, 13), (0, 32, 5, 3), (300, 128, 64, 8), (50, 40, 100, 40), (2000, 64, 16, 4)])
@pytest.mark.parametrize("gbits", [0, 4, 8])
@pytest.mark.parametrize("scoring,renorm", [("softmax", False), ("sigmoid", True), ("softmax", True), ("sigmoid", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_route(T, H, E, k, gbits, scoring, renorm, dtype):
    torch.manual_seed(1)
    x = torch.randn(T, H).to(dtype)
    dense = torch.randn(E, H) / H**0.5
    if gbits:
        g, s = R.quantize(dense, gbits, 32)
    else:
        g, s = dense.to(dtype if dtype != torch.float64 else torch.float32), None
    c0 = torch.randint(0, 5, (E,))
    c1 = c0.clone()
    rw, ri = R.route_profile(x, g, s, gbits, 32, k, scoring, renorm, c0)
    w, i = C.route_profile(x, g, s, gbits, 32, k, scoring, renorm, c1)
    assert i.dtype == torch.int32 and w.dtype == torch.float32
    # ids may only differ where logits nearly tie
    mism = (i != ri).any(1)
    assert mism.sum() <= 0.02 * max(T, 1), mism.sum()
    torch.testing.assert_close(w[~mism], rw[~mism], atol=2e-6, rtol=2e-5)
    assert torch.equal(c1 - c0, torch.bincount(i.flatten().long() - 0, minlength=E) - torch.bincount(ri.flatten().long(), minlength=E)) or True
    assert torch.equal(c1, torch.bincount(i.flatten().long(), minlength=E) + (c0 - torch.bincount(ri.flatten().long(), minlength=E)))


def test_route_ties():
    gate = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 0.0], [2.0, 1.0], [2.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    for k in (4, 6):
        c = torch.zeros(6, dtype=torch.long)
        w, i = C.route_profile(x, gate, None, 0, 1, k, "softmax", False, c)
        rw, ri = R.route_profile(x, gate, None, 0, 1, k, "softmax", False, torch.zeros(6, dtype=torch.long))
        assert torch.equal(i, ri), (i, ri)
    # k > 32 path with ties
    g = torch.randint(-2, 3, (80, 4)).float()
    x = torch.randint(-2, 3, (30, 4)).float()
    for k in (33, 80):
        w, i = C.route_profile(x, g, None, 0, 1, k, "softmax", False, torch.zeros(80, dtype=torch.long))
        rw, ri = R.route_profile(x, g, None, 0, 1, k, "softmax", False, torch.zeros(80, dtype=torch.long))
        assert torch.equal(i, ri)
        torch.testing.assert_close(w, rw)


def test_route_errors():
    x = torch.randn(4, 8)
    c = torch.zeros(5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="top_k"):
        C.route_profile(x, torch.randn(5, 8), None, 0, 1, 6, "softmax", False, c)
    with pytest.raises(RuntimeError, match="counts"):
        C.route_profile(x, torch.randn(5, 8), None, 0, 1, 2, "softmax", False, torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="counts"):
        C.route_profile(x, torch.randn(5, 8), None, 0, 1, 2, "softmax", False, torch.zeros(5))
    with pytest.raises(RuntimeError, match="gate_scales"):
        C.route_profile(x, torch.zeros(5, 4, dtype=torch.uint8), None, 4, 4, 2, "softmax", False, c)
    with pytest.raises(RuntimeError, match="gate_scales"):
        C.route_profile(x, torch.zeros(5, 4, dtype=torch.uint8), torch.zeros(5, 1), 4, 4, 2, "softmax", False, c)
    with pytest.raises(RuntimeError, match="gate"):
        C.route_profile(x, torch.zeros(5, 3, dtype=torch.uint8), torch.zeros(5, 2), 4, 4, 2, "softmax", False, c)
    with pytest.raises(RuntimeError, match="scoring"):
        C.route_profile(x, torch.randn(5, 8), None, 0, 1, 2, "relu", False, c)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        C.route_profile(torch.randn(8, 4).t(), torch.randn(5, 8), None, 0, 1, 2, "softmax", False, c)


@pytest.mark.parametrize("T,k,E,G", [(25, 4, 9, 5), (0, 3, 4, 2), (40, 1, 1, 1), (30, 7, 7, 3), (100, 20, 20, 4), (1, 50, 60, 60)])
@pytest.mark.parametrize("idt", [torch.int32, torch.int64])
def test_routing(T, k, E, G, idt):
    g = torch.Generator().manual_seed(T + k)
    ids = torch.randint(0, E, (T, k), generator=g).to(idt)
    e2g = torch.randint(-1, G, (E,), generator=g).to(torch.int32)
    exp = R.moe_routing(ids, e2g, G)
    got = C.moe_routing(ids, e2g, G)
    for a, b in zip(got, exp):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_routing_errors():
    with pytest.raises(IndexError, match=r"topk_ids\[0, 1\] = 7 is out of range \[0, 4\)"):
        C.moe_routing(torch.tensor([[0, 7]], dtype=torch.int32), torch.zeros(4, dtype=torch.int32), 1)
    with pytest.raises(IndexError, match=r"topk_ids\[1, 0\] = -1"):
        C.moe_routing(torch.tensor([[0, 1], [-1, 0]]), torch.zeros(4, dtype=torch.int32), 1)
    with pytest.raises(IndexError, match=r"expert_to_group\[0\] = 3"):
        C.moe_routing(torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3], dtype=torch.int32), 2)
    with pytest.raises(IndexError, match=r"expert_to_group\[1\] = -2"):
        C.moe_routing(torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0, -2], dtype=torch.int32), 2)


def _case(T, H, I, E, k, mapping, routing, dtype, seed=0, split=None, frozen=None):
    g = torch.Generator().manual_seed(seed)
    if mapping == "identity":
        e2g, G = torch.arange(E, dtype=torch.int32), E
    elif mapping == "merged":
        G = max(2, E // 3)
        e2g = torch.randint(0, G - 1, (E,), generator=g, dtype=torch.int32)
    elif mapping == "dropped":
        e2g = torch.arange(E, dtype=torch.int32); e2g[::3] = -1; G = E
    if routing == "dup":
        ids = torch.randint(0, E, (T, k), generator=g)
    elif routing == "one":
        ids = torch.zeros(T, k, dtype=torch.long)
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.rand(T, k, generator=g)
    gu = (torch.randn(G, 2 * I, H, generator=g) / H**0.5).to(dtype)
    dn = (torch.randn(G, H, I, generator=g) / I**0.5).to(dtype)
    gy = torch.randn(T, H, generator=g).to(dtype)
    return x, ids, w, gu, dn, e2g, G, gy


def _run(mod, x, ids, w, gu_list, dn_list, e2g, G, gy, act, need_x, need_w, need_stacks):
    offs, ss, pos = R.moe_routing(ids, e2g, G)
    y, pre, pw = mod.merged_moe_fwd(x, w, gu_list, dn_list, offs, ss, pos, act)
    grads = mod.merged_moe_bwd(gy, x, w, gu_list, dn_list, pre, pw, offs, ss, pos, act, need_x, need_w, need_stacks)
    return (y, pre, pw), grads


CASES = [
    (33, 97, 47, 7, 2, "identity", "rand"),
    (16, 32, 16, 1, 1, "identity", "rand"),
    (12, 40, 24, 5, 5, "identity", "rand"),
    (0, 32, 16, 4, 2, "identity", "rand"),
    (40, 48, 32, 13, 3, "merged", "rand"),
    (40, 48, 32, 9, 4, "dropped", "rand"),
    (30, 32, 16, 6, 3, "merged", "dup"),
    (50, 32, 24, 8, 2, "identity", "one"),
    (50, 32, 24, 8, 2, "merged", "one"),
    (600, 64, 40, 4, 2, "identity", "rand"),  # chunked groups (> 256 rows... chunk rows >= 256)
    (3000, 16, 8, 2, 2, "identity", "rand"),
    (700, 2048, 32, 2, 1, "identity", "rand"),  # groups of ~350 rows > 256-row chunks
]


def _tol(dtype):
    return {torch.float32: (1e-5, 1e-5), torch.float64: (1e-6, 1e-6), torch.bfloat16: (5e-2, 5e-2), torch.float16: (1e-2, 1e-2)}[dtype]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("wdt", ["f32", "x"])
def test_moe(case, dtype, act, wdt):
    x, ids, w, gu, dn, e2g, G, gy = _case(*case, dtype)
    if wdt == "x":
        w = w.to(dtype)
    gy_nc = torch.stack((gy, torch.full_like(gy, 99)), 2).reshape(gy.shape[0], 2 * gy.shape[1])[:, ::2]
    ref = _run(R, x, ids, w, [gu], [dn], e2g, G, gy, act, True, True, [True])
    got = _run(C, x, ids, w, [gu], [dn], e2g, G, gy_nc, act, True, True, [True])
    rt, at = _tol(dtype)
    for a, b in zip(got[0], ref[0]):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b.double(), rtol=rt, atol=at)
    (gx, gw, ggu, gdn), (rgx, rgw, rggu, rgdn) = got[1], ref[1]
    for a, b in [(gx, rgx), (gw, rgw), (ggu[0], rggu[0]), (gdn[0], rgdn[0])]:
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a.double(), b.double(), rtol=rt, atol=at * max(1, b.abs().max().item() if b.numel() else 1))


@pytest.mark.parametrize("need_x,need_w", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("stacks", [(True, False), (False, True), (False, False), (True, True)])
def test_moe_two_stacks(need_x, need_w, stacks):
    x, ids, w, gu, dn, e2g, G, gy = _case(40, 48, 32, 10, 3, "merged", "dup", torch.float32)
    gy = gy.expand(40, 48) if False else torch.randn(1, 48).expand(40, 48)
    gul, dnl = [gu[:2].contiguous(), gu[2:].contiguous()], [dn[:2].contiguous(), dn[2:].contiguous()]
    ref = _run(R, x, ids, w, gul, dnl, e2g, G, gy, "silu", need_x, need_w, list(stacks))
    got = _run(C, x, ids, w, gul, dnl, e2g, G, gy, "silu", need_x, need_w, list(stacks))
    for a, b in zip(got[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (gx, gw, ggu, gdn), (rgx, rgw, rggu, rgdn) = got[1], ref[1]
    for a, b in [(gx, rgx), (gw, rgw)] + list(zip(ggu, rggu)) + list(zip(gdn, rgdn)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_moe_errors():
    x, ids, w, gu, dn, e2g, G, gy = _case(10, 16, 8, 4, 2, "identity", "rand", torch.float32)
    offs, ss, pos = R.moe_routing(ids, e2g, G)
    with pytest.raises(RuntimeError, match="down\\[0\\]"):
        C.merged_moe_fwd(x, w, [gu], [dn[:, :, :4]], offs, ss, pos, "silu")
    with pytest.raises(RuntimeError, match="gate_up\\[0\\]"):
        C.merged_moe_fwd(x, w, [gu.double()], [dn], offs, ss, pos, "silu")
    with pytest.raises(RuntimeError, match="contiguous"):
        C.merged_moe_fwd(x, w, [gu.transpose(1, 2).contiguous().transpose(1, 2)], [dn], offs, ss, pos, "silu")
    bad = ss.clone(); bad[0] = 10**6
    with pytest.raises(IndexError, match="sorted_slot"):
        C.merged_moe_fwd(x, w, [gu], [dn], offs, bad, pos, "silu")
    bad = pos.clone(); bad[0, 0] = 10**6
    with pytest.raises(IndexError, match="pair_of_slot"):
        C.merged_moe_fwd(x, w, [gu], [dn], offs, ss, bad, "silu")
    bad = offs.clone(); bad[2] = 10**6
    with pytest.raises(IndexError, match="group_offsets"):
        C.merged_moe_fwd(x, w, [gu], [dn], offs.flip(0).contiguous(), ss, pos, "silu")
    with pytest.raises(RuntimeError, match="group_offsets"):
        C.merged_moe_fwd(x, w, [gu], [dn], offs[:-1], ss, pos, "silu")
    with pytest.raises(RuntimeError, match="activation"):
        C.merged_moe_fwd(x, w, [gu], [dn], offs, ss, pos, "relu")
    y, pre, pw = C.merged_moe_fwd(x, w, [gu], [dn], offs, ss, pos, "silu")
    with pytest.raises(RuntimeError, match="grad_y"):
        C.merged_moe_bwd(gy[:, :4], x, w, [gu], [dn], pre, pw, offs, ss, pos, "silu", True, True, [True])
    with pytest.raises(RuntimeError, match="need_grad_stacks"):
        C.merged_moe_bwd(gy, x, w, [gu], [dn], pre, pw, offs, ss, pos, "silu", True, True, [True, False])
    with pytest.raises(RuntimeError, match="pre_act"):
        C.merged_moe_bwd(gy, x, w, [gu], [dn], pre[:3], pw, offs, ss, pos, "silu", True, True, [True])
