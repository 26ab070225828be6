"""The case table of tests/ops/test_bad_inputs.py, and the child process that runs it.

A case is one call of a public entry of flux.ops (or of a custom op of flux.ops.library, or of
a native kernel of flux._C, the memory-safety net) with either

- one bad argument: the call must raise ``exc`` and the message must name the argument
  (``names``, matched as whole words) and, where given, the expected value (``also``); or
- a well-defined corner case or a NaN / Inf input (``exc is None``): the call returns normally
  and checks the defined answer itself (an AssertionError says what differs).

The cases run in a child process (``python -m tests.ops.bad_input_cases BACKEND``, case names on
stdin, one JSON line per case on stdout) so that a crash of a native kernel fails the test
that names the case instead of killing the test session.  The child prints a "start" line
before each case, so the parent knows which case a dying child was running.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import flux.ops as ops
from flux.ops import library
from flux.ops.quantized import QuantizedTensor

# The backends that run on CPU here (triton under TRITON_INTERPRET=1, set by tests/conftest.py).
CPU_BACKENDS = ("reference", "cpp", "triton")
NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # the entry it exercises (the suite checks that every entry has cases)
    call: Callable[[], Any]
    exc: type[BaseException] | None = None  # None: a corner case that must return normally
    names: tuple[str, ...] = ()  # argument names the message must contain
    also: tuple[str, ...] = ()  # further text the message must contain (the expected value)
    backends: tuple[str, ...] = CPU_BACKENDS
    known_deviation: tuple[tuple[str, str], ...] = ()  # (backend, why): expected to fail there (strict xfail)

    @property
    def id(self) -> str:
        return f"{self.op}: {self.name}"


CASES: list[Case] = []


def bad(name: str, op: str, call: Callable[[], Any], exc: type[BaseException], names: str | tuple[str, ...],
        also: tuple[str, ...] = (), backends: tuple[str, ...] = CPU_BACKENDS) -> None:
    CASES.append(Case(name, op, call, exc, (names,) if isinstance(names, str) else names, also, backends))


def corner(name: str, op: str, backends: tuple[str, ...] = CPU_BACKENDS,
           known_deviation: tuple[tuple[str, str], ...] = ()):
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        CASES.append(Case(name, op, fn, None, backends=backends, known_deviation=known_deviation))
        return fn

    return register


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================= merged_moe
def moe_args(**override: Any) -> dict[str, Any]:
    """Valid merged_moe arguments (T=2, H=8, I=3, E=4, G=2, k=2), with ``override`` applied."""
    g = gen()
    args = dict(
        x=torch.randn(2, 8, generator=g),
        topk_ids=torch.tensor([[0, 3], [1, 2]], dtype=torch.int32),
        topk_weights=torch.ones(2, 2),
        gate_up=torch.randn(2, 6, 8, generator=g),
        down=torch.randn(2, 8, 3, generator=g),
        expert_to_group=torch.tensor([0, 1, 1, 0], dtype=torch.int32),
        activation="silu",
    )
    args.update(override)
    return args


def moe(**override: Any) -> Callable[[], Tensor]:
    def call() -> Tensor:
        a = moe_args(**override)
        return ops.merged_moe(a["x"], a["topk_ids"], a["topk_weights"], a["gate_up"], a["down"],
                              a["expert_to_group"], activation=a["activation"])

    return call


def ids64(*values: int) -> Tensor:
    return torch.tensor([[0, values[0]], [1, values[1] if len(values) > 1 else 2]], dtype=torch.int64)


def e2g64(value: int) -> Tensor:
    return torch.tensor([0, value, 1, 0], dtype=torch.int64)


def quantized_stack(shape=(2, 6, 8), bits=4, group_size=4) -> QuantizedTensor:
    return ops.quantize(torch.randn(shape, generator=gen(1)), bits, group_size)


def stale(q: QuantizedTensor, **fields: Any) -> QuantizedTensor:
    """``q`` with fields overwritten behind the frozen dataclass (what a caller mutating a
    QuantizedTensor in place amounts to): only the use-time validate() can catch it."""
    for key, value in fields.items():
        object.__setattr__(q, key, value)
    return q


M = "merged_moe"
bad("x not a tensor", M, moe(x=[[0.0] * 8] * 2), TypeError, "x")
bad("x integer dtype", M, moe(x=torch.ones(2, 8, dtype=torch.int64)), TypeError, "x", ("floating",))
bad("x 1-D", M, moe(x=torch.randn(8)), ValueError, "x", ("[T, H]",))
bad("x 3-D", M, moe(x=torch.randn(2, 8, 1)), ValueError, "x")
bad("topk_ids not a tensor", M, moe(topk_ids=[[0, 3], [1, 2]]), TypeError, "topk_ids")
bad("topk_ids float", M, moe(topk_ids=torch.zeros(2, 2)), TypeError, "topk_ids", ("int32/int64",))
bad("topk_ids int16", M, moe(topk_ids=torch.zeros(2, 2, dtype=torch.int16)), TypeError, "topk_ids")
bad("topk_ids bool", M, moe(topk_ids=torch.zeros(2, 2, dtype=torch.bool)), TypeError, "topk_ids")
bad("topk_ids 1-D", M, moe(topk_ids=torch.zeros(2, dtype=torch.int32)), ValueError, "topk_ids", ("[T, k]",))
bad("topk_ids rows != T", M, moe(topk_ids=torch.zeros(3, 2, dtype=torch.int32), topk_weights=torch.ones(3, 2)),
    ValueError, "topk_ids", ("T = x.shape[0] = 2",))
bad("topk_ids id == E", M, moe(topk_ids=torch.tensor([[0, 4], [1, 2]], dtype=torch.int32)), IndexError, "topk_ids",
    ("[0, 4)",))
bad("topk_ids negative id", M, moe(topk_ids=torch.tensor([[0, -1], [1, 2]], dtype=torch.int32)), IndexError,
    "topk_ids")
bad("topk_ids int64 2**32", M, moe(topk_ids=ids64(2**32)), IndexError, "topk_ids", ("4294967296",))
bad("topk_ids int64 -2**32", M, moe(topk_ids=ids64(-(2**32))), IndexError, "topk_ids", ("-4294967296",))
bad("topk_ids int64 2**31", M, moe(topk_ids=ids64(2**31)), IndexError, "topk_ids")
bad("topk_weights not a tensor", M, moe(topk_weights=1.0), TypeError, "topk_weights")
bad("topk_weights integer", M, moe(topk_weights=torch.ones(2, 2, dtype=torch.int32)), TypeError, "topk_weights")
bad("topk_weights float64 with fp32 x", M, moe(topk_weights=torch.ones(2, 2, dtype=torch.float64)), TypeError,
    "topk_weights", ("x.dtype",))
bad("topk_weights shape", M, moe(topk_weights=torch.ones(2, 3)), ValueError, "topk_weights", ("(2, 2)",))
bad("topk_weights 1-D", M, moe(topk_weights=torch.ones(4)), ValueError, "topk_weights")
bad("expert_to_group not a tensor", M, moe(expert_to_group=[0, 1, 1, 0]), TypeError, "expert_to_group")
bad("expert_to_group float", M, moe(expert_to_group=torch.zeros(4)), TypeError, "expert_to_group")
bad("expert_to_group 2-D", M, moe(expert_to_group=torch.zeros(2, 2, dtype=torch.int32)), ValueError,
    "expert_to_group", ("[E]",))
bad("expert_to_group empty", M, moe(expert_to_group=torch.zeros(0, dtype=torch.int32)), ValueError,
    "expert_to_group", ("E >= 1",))
bad("expert_to_group group == G", M, moe(expert_to_group=torch.tensor([0, 2, 1, 0], dtype=torch.int32)), IndexError,
    "expert_to_group", ("[-1, 2)",))
bad("expert_to_group below -1", M, moe(expert_to_group=torch.tensor([0, -2, 1, 0], dtype=torch.int32)), IndexError,
    "expert_to_group")
# int64 values that .to(int32) would wrap onto a valid group (2**32 -> 0, -2**32 + 1 -> 1)
bad("expert_to_group int64 2**32", M, moe(expert_to_group=e2g64(2**32)), IndexError, "expert_to_group",
    ("4294967296", "[-1, 2)"))
bad("expert_to_group int64 -2**32+1", M, moe(expert_to_group=e2g64(-(2**32) + 1)), IndexError, "expert_to_group",
    ("-4294967295",))
bad("expert_to_group int64 -2**32+2", M, moe(expert_to_group=e2g64(-(2**32) + 2)), IndexError, "expert_to_group")
bad("expert_to_group int64 2**31", M, moe(expert_to_group=e2g64(2**31)), IndexError, "expert_to_group")
bad("activation unknown", M, moe(activation="relu"), ValueError, "activation", ("silu",))
bad("activation None", M, moe(activation=None), TypeError, "activation")
bad("activation int", M, moe(activation=1), TypeError, "activation")
bad("gate_up None", M, moe(gate_up=None), TypeError, "gate_up")
bad("gate_up str", M, moe(gate_up="weights"), TypeError, "gate_up")
bad("gate_up empty list", M, moe(gate_up=[]), ValueError, "gate_up", ("at least one",))
bad("gate_up list of None", M, moe(gate_up=[None]), TypeError, "gate_up[0]")
bad("gate_up 2-D", M, moe(gate_up=torch.randn(6, 8)), ValueError, "gate_up[0]", ("3-D",))
bad("gate_up odd 2I", M, moe(gate_up=torch.randn(2, 5, 8)), ValueError, "gate_up[0]", ("2I",))
bad("gate_up I = 0", M, moe(gate_up=torch.randn(2, 0, 8), down=torch.randn(2, 8, 0)), ValueError, "gate_up[0]",
    ("I >= 1",))
bad("gate_up hidden != H", M, moe(gate_up=torch.randn(2, 6, 9)), ValueError, "gate_up[0]", ("H = x.shape[1]",))
bad("gate_up float64", M, moe(gate_up=torch.randn(2, 6, 8, dtype=torch.float64)), TypeError, "gate_up[0]")
bad("gate_up non-contiguous", M, moe(gate_up=torch.randn(2, 8, 6).transpose(1, 2)), ValueError, "gate_up[0]",
    ("contiguous",))
bad("gate_up second stack 2I differs", M,
    moe(gate_up=[torch.randn(1, 6, 8), torch.randn(1, 4, 8)], down=[torch.randn(1, 8, 3), torch.randn(1, 8, 2)]),
    ValueError, "gate_up[1]")
bad("down I mismatch", M, moe(down=torch.randn(2, 8, 4)), ValueError, "down[0]", ("[2, 8, 3]",))
bad("down group count mismatch", M, moe(down=torch.randn(3, 8, 3)), ValueError, "down[0]")
bad("down float16", M, moe(down=torch.randn(2, 8, 3).half()), TypeError, "down[0]")
bad("down not a tensor", M, moe(down=3), TypeError, "down")
bad("stack count mismatch", M, moe(down=[torch.randn(1, 8, 3), torch.randn(1, 8, 3)]), ValueError,
    ("gate_up", "down"), ("stacks",))
bad("quantized gate_up 2-D", M, moe(gate_up=quantized_stack((6, 8))), ValueError, "gate_up[0]")
bad("quantized gate_up stale bits", M, lambda: moe(gate_up=stale(quantized_stack(), bits=8))(), TypeError,
    "gate_up[0].qdata", ("int8",))
bad("quantized down stale group_size", M,
    lambda: moe(down=stale(quantized_stack((2, 8, 3), 8, 1), group_size=2))(), ValueError, "down[0].scales")


def moe_grads(x, topk_ids, topk_weights, gate_up: list, down: list, expert_to_group, grad_y=None):
    """(y, grad x, grad topk_weights, grads gate_up, grads down) of flux.ops.merged_moe."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, topk_weights)]
    gu = [w.detach().clone().requires_grad_() for w in gate_up]
    dn = [w.detach().clone().requires_grad_() for w in down]
    y = ops.merged_moe(leaves[0], topk_ids, leaves[1], gu, dn, expert_to_group)
    y.backward(torch.ones_like(y) if grad_y is None else grad_y)
    return y.detach(), leaves[0].grad, leaves[1].grad, [w.grad for w in gu], [w.grad for w in dn]


def assert_zero(t: Tensor | None, shape: tuple, what: str) -> None:
    assert t is not None, f"{what}: no gradient"
    assert tuple(t.shape) == shape, f"{what}: shape {tuple(t.shape)}, expected {shape}"
    assert not t.any(), f"{what}: expected zeros, got max |.| {t.abs().max()}"


@corner("every expert dropped: y = 0, gradients 0", M)
def _():
    a = moe_args(expert_to_group=torch.full((4,), -1, dtype=torch.int32))
    y, gx, gw, ggu, gdn = moe_grads(a["x"], a["topk_ids"], a["topk_weights"], [a["gate_up"]], [a["down"]],
                                    a["expert_to_group"])
    assert_zero(y, (2, 8), "y")
    assert_zero(gx, (2, 8), "grad x")
    assert_zero(gw, (2, 2), "grad topk_weights")
    assert_zero(ggu[0], (2, 6, 8), "grad gate_up")
    assert_zero(gdn[0], (2, 8, 3), "grad down")


@corner("only a zero-group stack (G = 0): y = 0, gradients 0", M)
def _():
    a = moe_args(expert_to_group=torch.full((4,), -1, dtype=torch.int32))
    y, gx, gw, ggu, gdn = moe_grads(a["x"], a["topk_ids"], a["topk_weights"], [torch.randn(0, 6, 8)],
                                    [torch.randn(0, 8, 3)], a["expert_to_group"])
    assert_zero(y, (2, 8), "y")
    assert_zero(gx, (2, 8), "grad x")
    assert_zero(gw, (2, 2), "grad topk_weights")
    assert_zero(ggu[0], (0, 6, 8), "grad gate_up")
    assert_zero(gdn[0], (0, 8, 3), "grad down")


@corner("a zero-group stack next to a real one changes nothing", M)
def _():
    a = moe_args()
    one = moe_grads(a["x"], a["topk_ids"], a["topk_weights"], [a["gate_up"]], [a["down"]], a["expert_to_group"])
    for order in ("empty first", "empty last"):
        gu = [torch.randn(0, 6, 8), a["gate_up"]] if order == "empty first" else [a["gate_up"], torch.randn(0, 6, 8)]
        dn = [torch.randn(0, 8, 3), a["down"]] if order == "empty first" else [a["down"], torch.randn(0, 8, 3)]
        two = moe_grads(a["x"], a["topk_ids"], a["topk_weights"], gu, dn, a["expert_to_group"])
        real = 1 if order == "empty first" else 0
        for got, want, what in ((two[0], one[0], "y"), (two[1], one[1], "grad x"), (two[2], one[2], "grad w"),
                                (two[3][real], one[3][0], "grad gate_up"), (two[4][real], one[4][0], "grad down")):
            torch.testing.assert_close(got, want, msg=lambda m: f"{order}: {what}: {m}")
        assert two[3][1 - real].shape == (0, 6, 8) and two[4][1 - real].shape == (0, 8, 3)


@corner("a quantized zero-group frozen stack next to a trainable one", M)
def _():
    a = moe_args()
    frozen_gu, frozen_dn = ops.quantize(torch.randn(0, 6, 8), 4, 4), ops.quantize(torch.randn(0, 8, 3), 4, 4)
    y = ops.merged_moe(a["x"], a["topk_ids"], a["topk_weights"], [a["gate_up"], frozen_gu], [a["down"], frozen_dn],
                       a["expert_to_group"])
    torch.testing.assert_close(y, moe(**{})())


@corner("k = 0 (no slot): y = 0, gradients 0", M)
def _():
    a = moe_args()
    y, gx, gw, ggu, gdn = moe_grads(a["x"], torch.zeros(2, 0, dtype=torch.int32), torch.ones(2, 0), [a["gate_up"]],
                                    [a["down"]], a["expert_to_group"])
    assert_zero(y, (2, 8), "y")
    assert_zero(gx, (2, 8), "grad x")
    assert_zero(gw, (2, 0), "grad topk_weights")
    assert_zero(ggu[0], (2, 6, 8), "grad gate_up")


@corner("T = 0 (no token): empty y and gradients", M)
def _():
    a = moe_args()
    y, gx, gw, ggu, _ = moe_grads(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.int32), torch.ones(0, 2),
                                  [a["gate_up"]], [a["down"]], a["expert_to_group"])
    assert y.shape == (0, 8) and gx.shape == (0, 8) and gw.shape == (0, 2)
    assert_zero(ggu[0], (2, 6, 8), "grad gate_up")


@corner("H = 0: y [T, 0], gradients 0", M)
def _():
    a = moe_args()
    y, gx, gw, ggu, gdn = moe_grads(torch.randn(2, 0), a["topk_ids"], a["topk_weights"], [torch.randn(2, 6, 0)],
                                    [torch.randn(2, 0, 3)], a["expert_to_group"])
    assert y.shape == (2, 0) and gx.shape == (2, 0)
    assert_zero(gw, (2, 2), "grad topk_weights")
    assert ggu[0].shape == (2, 6, 0) and gdn[0].shape == (2, 0, 3)


@corner("int64 expert_to_group in range equals int32", M)
def _():
    torch.testing.assert_close(moe(expert_to_group=torch.tensor([0, 1, -1, 0]))(),
                               moe(expert_to_group=torch.tensor([0, 1, -1, 0], dtype=torch.int32))())


# ----------------------------------------------------------------------------- merged_moe: NaN / Inf
def naive_moe(x, topk_ids, topk_weights, gate_up, down, expert_to_group, activation="silu") -> Tensor:
    """Slot-by-slot loop, no zero terms (tests/oracle's keeps every input in the graph with
    ``* 0``, which would spread one NaN everywhere): the PyTorch semantics of NaN / Inf."""
    groups = expert_to_group.long()[topk_ids.long()]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(topk_ids.shape[1]):
            g = int(groups[t, j])
            if g < 0:
                continue  # a dropped slot is never computed: its weight is not read
            h = gate_up[g] @ x[t]
            gate, up = h.chunk(2)
            act = (F.silu(gate) if activation == "silu" else F.gelu(gate)) * up
            acc = acc + topk_weights[t, j] * (down[g] @ act)
        rows.append(acc)
    return torch.stack(rows)


def assert_same_nonfinite(got: Tensor, want: Tensor, what: str) -> None:
    """Same NaN positions, same +-Inf positions, finite values close."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (
        f"{what}: NaN at {torch.isnan(got).nonzero().tolist()}, expected at {torch.isnan(want).nonzero().tolist()}")
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)], want[torch.isinf(want)]), (
        f"{what}: Inf at {torch.isinf(got).nonzero().tolist()}, expected at {torch.isinf(want).nonzero().tolist()}")
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


def nan_moe_case(poison: Callable[[dict], None], backward: bool = False) -> Callable[[], None]:
    """merged_moe vs the naive loop on inputs ``poison`` puts NaN / Inf into (T=6, E=6, G=4,
    expert 4 dropped; token 0 routes a slot to the dropped expert, token 2 hits group 3)."""

    def check() -> None:
        g = gen(5)
        a = dict(
            x=torch.randn(6, 16, generator=g),
            topk_ids=torch.tensor([[0, 4], [4, 5], [3, 1], [2, 0], [5, 1], [1, 2]], dtype=torch.int32),
            topk_weights=torch.rand(6, 2, generator=g),
            gate_up=torch.randn(4, 16, 16, generator=g) / 4,
            down=torch.randn(4, 16, 8, generator=g) / 3,
            expert_to_group=torch.tensor([0, 1, 2, 3, -1, 1], dtype=torch.int32),
            grad_y=torch.randn(6, 16, generator=g),
        )
        poison(a)
        want_leaves = {n: a[n].clone().requires_grad_() for n in ("x", "topk_weights", "gate_up", "down")}
        want = naive_moe(want_leaves["x"], a["topk_ids"], want_leaves["topk_weights"], want_leaves["gate_up"],
                         want_leaves["down"], a["expert_to_group"])
        y, gx, gw, ggu, gdn = moe_grads(a["x"], a["topk_ids"], a["topk_weights"], [a["gate_up"]], [a["down"]],
                                        a["expert_to_group"], a["grad_y"])
        assert_same_nonfinite(y, want.detach(), "y")
        if backward:
            want.backward(a["grad_y"])
            for got, name in ((gx, "x"), (gw, "topk_weights"), (ggu[0], "gate_up"), (gdn[0], "down")):
                assert_same_nonfinite(got, want_leaves[name].grad, f"grad {name}")

    return check


def put(name: str, index: tuple, value: float) -> Callable[[dict], None]:
    def poison(a: dict) -> None:
        a[name][index] = value

    return poison


corner("NaN: x row -> that token's y", M)(nan_moe_case(put("x", (2, 5), NAN)))
corner("NaN: x row, backward", M)(nan_moe_case(put("x", (2, 5), NAN), backward=True))
corner("Inf: +Inf in x", M)(nan_moe_case(put("x", (3, 0), INF)))
corner("Inf: -Inf in x, backward", M)(nan_moe_case(put("x", (3, 0), -INF), backward=True))
corner("NaN: gate_up of one group", M)(nan_moe_case(put("gate_up", (3, 0, 0), NAN), backward=True))
corner("Inf: down of one group", M)(nan_moe_case(put("down", (1, 0, 0), INF)))
corner("NaN: routing weight", M)(nan_moe_case(put("topk_weights", (2, 0), NAN), backward=True))
corner("NaN: weight of a dropped slot is not read", M)(nan_moe_case(put("topk_weights", (0, 1), NAN)))
corner("NaN: grad_y row", M)(nan_moe_case(put("grad_y", (5, 2), NAN), backward=True))


@corner("NaN: zero weight times a NaN expert is NaN", M)
def _():
    def poison(a: dict) -> None:
        a["topk_weights"][2, 0] = 0.0
        a["gate_up"][3, 0, 0] = NAN

    nan_moe_case(poison)()


# ============================================================================= route_profile
def rp(x=None, gate=None, top_k: Any = 2, **kwargs: Any) -> Callable[[], Any]:
    def call():
        g = gen(2)
        xx = torch.randn(4, 8, generator=g) if x is None else x() if callable(x) else x
        gg = torch.randn(5, 8, generator=g) if gate is None else gate() if callable(gate) else gate
        return ops.route_profile(xx, gg, top_k, **kwargs)

    return call


R = "route_profile"
bad("x not a tensor", R, rp(x=[[1.0] * 8]), TypeError, "x")
bad("x integer", R, rp(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x", ("floating",))
bad("x 3-D", R, rp(x=torch.randn(4, 8, 2)), ValueError, "x", ("[T, H]",))
bad("x 1-D", R, rp(x=torch.randn(8)), ValueError, "x")
bad("gate None", R, lambda: ops.route_profile(torch.randn(4, 8), None, 2), TypeError, "gate")
bad("gate integer", R, rp(gate=torch.ones(5, 8, dtype=torch.int32)), TypeError, "gate")
bad("gate 3-D", R, rp(gate=torch.randn(5, 8, 1)), ValueError, "gate")
bad("gate hidden != H", R, rp(gate=torch.randn(5, 9)), ValueError, "gate", ("hidden size",))
bad("gate no experts", R, rp(gate=torch.randn(0, 8), top_k=1), ValueError, "gate", ("at least one expert",))
bad("top_k bool", R, rp(top_k=True), TypeError, "top_k", ("bool",))
bad("top_k float", R, rp(top_k=2.0), TypeError, "top_k")
bad("top_k str", R, rp(top_k="2"), TypeError, "top_k")
bad("top_k 0", R, rp(top_k=0), ValueError, "top_k", ("[1, 5]",))
bad("top_k negative", R, rp(top_k=-1), ValueError, "top_k")
bad("top_k > E", R, rp(top_k=6), ValueError, "top_k", ("[1, 5]",))
bad("scoring unknown", R, rp(scoring="relu"), ValueError, "scoring", ("softmax",))
bad("scoring None", R, rp(scoring=None), TypeError, "scoring")
bad("renormalize str", R, rp(renormalize="no"), TypeError, "renormalize", ("bool",))
bad("renormalize int", R, rp(renormalize=1), TypeError, "renormalize")
bad("counts wrong size", R, rp(counts=torch.zeros(4, dtype=torch.int64)), ValueError, "counts", ("[5]",))
bad("counts float", R, rp(counts=torch.zeros(5)), TypeError, "counts", ("int64",))
bad("counts int32", R, rp(counts=torch.zeros(5, dtype=torch.int32)), TypeError, "counts")
bad("counts 2-D", R, rp(counts=torch.zeros(5, 1, dtype=torch.int64)), ValueError, "counts")
bad("counts non-contiguous", R, rp(counts=torch.zeros(10, dtype=torch.int64)[::2]), ValueError, "counts",
    ("contiguous",))
bad("counts a list", R, rp(counts=[0] * 5), TypeError, "counts")
bad("quantized gate 3-D", R, rp(gate=lambda: quantized_stack((5, 8, 8))), ValueError, "gate")
bad("quantized gate hidden != H", R, rp(gate=lambda: quantized_stack((5, 16))), ValueError, "gate",
    ("hidden size",))
bad("quantized gate stale scales", R,
    rp(gate=lambda: stale(quantized_stack((5, 8)), scales=torch.ones(5, 3))), ValueError, "gate.scales",
    ("[5, 2]",))
bad("quantized gate stale bits", R, rp(gate=lambda: stale(quantized_stack((5, 8)), bits=True)), TypeError,
    "gate.bits")


@corner("T = 0: empty outputs, counts unchanged", R)
def _():
    counts = torch.arange(5)
    w, ids, out = ops.route_profile(torch.randn(0, 8), torch.randn(5, 8), 2, counts=counts)
    assert w.shape == (0, 2) and ids.shape == (0, 2) and out is counts and counts.tolist() == [0, 1, 2, 3, 4]


@corner("H = 0: logits 0, uniform weights, ids 0..k-1", R)
def _():
    w, ids, counts = ops.route_profile(torch.randn(3, 0), torch.randn(4, 0), 2)
    assert ids.tolist() == [[0, 1]] * 3, ids.tolist()
    torch.testing.assert_close(w, torch.full((3, 2), 0.25))
    assert counts.tolist() == [3, 3, 0, 0]


@corner("top_k = E, int64 and numpy-style ints accepted", R)
def _():
    w, ids, _ = ops.route_profile(torch.randn(3, 8), torch.randn(5, 8), torch.tensor(5))
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(w.sum(1), torch.ones(3))


def route_oracle(x: Tensor, w: Tensor, k: int, scoring: str, renormalize: bool):
    """PyTorch semantics in fp32: torch.sort (NaN first, stable), softmax / sigmoid."""
    logits = x.float() @ w.float().t()
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def nan_route_case(poison_x: Callable[[Tensor], None] | None, poison_gate: Callable[[Tensor], None] | None,
                   scoring: str, renormalize: bool = False, quantized: bool = False,
                   expect: Callable[[Tensor, Tensor], None] | None = None) -> Callable[[], None]:
    def check() -> None:
        g = gen(7)
        x, gate = torch.randn(20, 16, generator=g), torch.randn(6, 16, generator=g)
        if poison_x:
            poison_x(x)
        if poison_gate:
            poison_gate(gate)
        used = gate
        if quantized:
            q = ops.quantize(gate, 8, 8)
            gate, used = q, q.dequantize(torch.float32)
        for k in (1, 3, 6):
            counts = torch.zeros(6, dtype=torch.int64)
            w, ids, _ = ops.route_profile(x, gate, k, scoring=scoring, renormalize=renormalize, counts=counts)
            want_w, want_ids = route_oracle(x, used, k, scoring, renormalize)
            assert torch.equal(ids.long(), want_ids), f"k={k}: ids {ids.tolist()} != {want_ids.tolist()}"
            assert_same_nonfinite(w, want_w, f"k={k} weights")
            assert counts.sum() == 20 * k and torch.equal(counts, torch.bincount(ids.flatten().long(), minlength=6))
            if expect:
                expect(w, ids)

    return check


def nan_first(expert: int) -> Callable[[Tensor, Tensor], None]:
    def expect(w: Tensor, ids: Tensor) -> None:
        assert (ids[:, 0] == expert).all(), f"the NaN expert {expert} must rank first: {ids[:, 0].tolist()}"
        assert torch.isnan(w[:, 0]).all()

    return expect


def put_t(index: tuple, value: float) -> Callable[[Tensor], None]:
    def poison(t: Tensor) -> None:
        t[index] = value

    return poison


corner("NaN: x row, softmax -> that token's weights NaN", R)(nan_route_case(put_t((3, 4), NAN), None, "softmax"))
corner("NaN: x row, sigmoid + renormalize", R)(nan_route_case(put_t((3, 4), NAN), None, "sigmoid", True))
# flux_kernels/route_profile.py (the Triton kernel) still ranks a NaN logit below every number.
TRITON_NAN_RANK = (("triton", "the Triton route_profile kernel ranks NaN logits last, not first"),)
corner("NaN: gate row, sigmoid -> NaN expert ranks first", R, known_deviation=TRITON_NAN_RANK)(
    nan_route_case(None, put_t((4, 2), NAN), "sigmoid", expect=nan_first(4)))
corner("NaN: gate row, softmax", R, known_deviation=TRITON_NAN_RANK)(
    nan_route_case(None, put_t((4, 2), NAN), "softmax", expect=nan_first(4)))
corner("NaN: quantized gate group", R, known_deviation=TRITON_NAN_RANK)(
    nan_route_case(None, put_t((2, 9), NAN), "sigmoid", quantized=True, expect=nan_first(2)))
corner("Inf: +Inf in x, softmax (Inf - Inf = NaN, like torch.softmax)", R)(
    nan_route_case(put_t((5, 0), INF), None, "softmax"))
corner("Inf: -Inf in x, sigmoid + renormalize", R)(nan_route_case(put_t((5, 0), -INF), None, "sigmoid", True))
corner("Inf: +Inf in gate, sigmoid", R)(nan_route_case(None, put_t((1, 3), INF), "sigmoid"))


@corner("NaN: an all-NaN row gives ids 0..k-1 (ties by index)", R)
def _():
    x = torch.full((2, 8), NAN)
    w, ids, _ = ops.route_profile(x, torch.randn(5, 8), 3)
    assert ids.tolist() == [[0, 1, 2]] * 2, ids.tolist()
    assert torch.isnan(w).all()


# ============================================================================= quantize
def qz(w: Any = None, **kwargs: Any) -> Callable[[], Any]:
    return lambda: ops.quantize(torch.randn(4, 8, generator=gen(3)) if w is None else w, **kwargs)


Q = "quantize"
bad("w not a tensor", Q, qz(w=[[1.0, 2.0]]), TypeError, "w")
bad("w integer", Q, qz(w=torch.ones(2, 8, dtype=torch.int32)), TypeError, "w", ("floating",))
bad("w bool", Q, qz(w=torch.ones(2, 8, dtype=torch.bool)), TypeError, "w")
bad("w 0-D", Q, qz(w=torch.tensor(1.0)), ValueError, "w", ("at least 1 dim",))
bad("bits 3", Q, qz(bits=3), ValueError, "bits", ("4 or 8",))
bad("bits True", Q, qz(bits=True), TypeError, "bits", ("bool",))
bad("bits 8.0", Q, qz(bits=8.0), TypeError, "bits")
bad("bits str", Q, qz(bits="4"), TypeError, "bits")
bad("group_size 0", Q, qz(group_size=0), ValueError, "group_size", ("[1, ",))
bad("group_size negative", Q, qz(group_size=-4), ValueError, "group_size")
bad("group_size True", Q, qz(group_size=True), TypeError, "group_size", ("bool",))
bad("group_size 2.5", Q, qz(group_size=2.5), TypeError, "group_size")
bad("group_size None", Q, qz(group_size=None), TypeError, "group_size")
bad("group_size 2**40", Q, qz(group_size=2**40), ValueError, "group_size")


@corner("empty and 1-D weights round-trip", Q)
def _():
    for shape in [(0, 8), (4, 0), (2, 0, 5), (0,), (3,), (1, 1)]:
        for bits in (4, 8):
            w = torch.randn(shape, generator=gen(4))
            q = ops.quantize(w, bits, 4)
            cols = shape[-1]
            rows = math.prod(shape[:-1])
            assert q.qdata.shape == (rows, cols if bits == 8 else (cols + 1) // 2), (shape, q.qdata.shape)
            assert q.scales.shape == (rows, -(-cols // 4)), (shape, q.scales.shape)
            d = q.dequantize()
            assert d.shape == w.shape and d.dtype == w.dtype
            assert ((d - w).abs() <= q.scales.repeat_interleave(4, 1)[:, :cols].view(w.shape) / 2 + 1e-6).all()


def nan_quantize_case(bits: int, value: float) -> Callable[[], None]:
    """A group holding NaN / Inf: scale NaN / +Inf, q = 0 there, the group dequantizes to NaN; the
    other groups are exactly those of the clean weight."""

    def check() -> None:
        clean = torch.randn(3, 20, generator=gen(6))
        w = clean.clone()
        w[1, 9] = value  # group 1 (columns 8..15) of row 1
        q, ref = ops.quantize(w, bits, 8), ops.quantize(clean, bits, 8)
        want_scale = NAN if value != value else INF
        s = q.scales[1, 1].item()
        assert (s != s) if want_scale != want_scale else s == INF, f"scale {s}, expected {want_scale}"
        mask = torch.zeros_like(q.scales, dtype=torch.bool)
        mask[1, 1] = True
        assert torch.equal(q.scales[~mask], ref.scales[~mask])
        deq = q.dequantize()
        bad_cols = torch.zeros_like(w, dtype=torch.bool)
        bad_cols[1, 8:16] = True
        assert torch.isnan(deq[bad_cols]).all(), deq[1]
        assert torch.equal(deq[~bad_cols], ref.dequantize()[~bad_cols])
        stored = q.qdata[1, 8:16] if bits == 8 else q.qdata[1, 4:8]
        zero = 0 if bits == 8 else 0x88  # q = 0 in both nibbles (stored + 8)
        assert (stored == zero).all(), f"q of the non-finite group: {stored.tolist()}"

    return check


for _bits in (4, 8):
    corner(f"NaN: group -> scale NaN, dequantizes to NaN (int{_bits})", Q)(nan_quantize_case(_bits, NAN))
    corner(f"Inf: group -> scale Inf, dequantizes to NaN (int{_bits})", Q)(nan_quantize_case(_bits, INF))
corner("Inf: -Inf group (int4)", Q)(nan_quantize_case(4, -INF))


@corner("NaN: bf16 / fp16 input", Q)
def _():
    for dtype in (torch.bfloat16, torch.float16):
        w = torch.randn(2, 16, generator=gen(8)).to(dtype)
        w[0, 3] = NAN
        d = ops.quantize(w, 4, 8).dequantize()
        assert torch.isnan(d[0, :8]).all() and torch.isfinite(d[0, 8:]).all() and torch.isfinite(d[1]).all()


# ============================================================================= QuantizedTensor
def parts(shape=(3, 4, 8), bits=4, group_size=4) -> dict[str, Any]:
    q = ops.quantize(torch.randn(shape, generator=gen(9)), bits, group_size)
    return dict(qdata=q.qdata, scales=q.scales, bits=bits, group_size=group_size, shape=q.shape, dtype=q.dtype)


def qt(**override: Any) -> Callable[[], QuantizedTensor]:
    def call() -> QuantizedTensor:
        p = parts()
        p.update({k: (v() if callable(v) else v) for k, v in override.items()})
        return QuantizedTensor(**p)

    return call


C = "QuantizedTensor()"
bad("bits 3", C, qt(bits=3), ValueError, "QuantizedTensor.bits", ("4 or 8",))
bad("bits True", C, qt(bits=True), TypeError, "QuantizedTensor.bits", ("bool",))
bad("bits 8 with uint8 qdata", C, qt(bits=8), TypeError, "QuantizedTensor.qdata", ("int8",))
bad("group_size 0", C, qt(group_size=0), ValueError, "QuantizedTensor.group_size")
bad("group_size True", C, qt(group_size=True), TypeError, "QuantizedTensor.group_size")
bad("group_size inconsistent with scales", C, qt(group_size=2), ValueError, "QuantizedTensor.scales",
    ("[12, 4]",))
bad("qdata int8 for 4 bits", C, qt(qdata=lambda: torch.zeros(12, 4, dtype=torch.int8)), TypeError,
    "QuantizedTensor.qdata", ("uint8",))
bad("qdata 1-D", C, qt(qdata=lambda: torch.zeros(48, dtype=torch.uint8)), ValueError, "QuantizedTensor.qdata")
bad("qdata wrong shape", C, qt(qdata=lambda: torch.zeros(12, 5, dtype=torch.uint8)), ValueError,
    "QuantizedTensor.qdata", ("[12, 4]",))
bad("qdata non-contiguous", C, qt(qdata=lambda: torch.zeros(4, 12, dtype=torch.uint8).t()), ValueError,
    "QuantizedTensor.qdata", ("contiguous",))
bad("qdata not a tensor", C, qt(qdata=[[0] * 4] * 12), TypeError, "QuantizedTensor.qdata")
bad("scales float16", C, qt(scales=lambda: torch.ones(12, 2, dtype=torch.float16)), TypeError,
    "QuantizedTensor.scales", ("float32",))
bad("scales wrong shape", C, qt(scales=lambda: torch.ones(12, 3)), ValueError, "QuantizedTensor.scales")
bad("scales not a tensor", C, qt(scales=1.0), TypeError, "QuantizedTensor.scales")
bad("scales on another device", C, qt(scales=lambda: torch.ones(12, 2, device="meta")), ValueError,
    "QuantizedTensor.scales", ("device",))
bad("shape inconsistent with qdata", C, qt(shape=torch.Size((3, 4, 10))), ValueError, "QuantizedTensor.qdata",
    ("(3, 4, 10)",))
bad("shape empty", C, qt(shape=torch.Size(())), ValueError, "QuantizedTensor.shape")
bad("shape negative", C, qt(shape=(3, -4, 8)), ValueError, "QuantizedTensor.shape[1]")
bad("shape bool entry", C, qt(shape=(3, True, 8)), TypeError, "QuantizedTensor.shape[1]")
bad("shape not a sequence", C, qt(shape=96), ValueError, "QuantizedTensor.shape")
bad("dtype int32", C, qt(dtype=torch.int32), TypeError, "QuantizedTensor.dtype", ("floating",))
bad("dtype str", C, qt(dtype="float32"), TypeError, "QuantizedTensor.dtype")


@corner("a tuple shape becomes torch.Size", C)
def _():
    p = parts()
    p["shape"] = (3, 4, 8)
    q = QuantizedTensor(**p)
    assert isinstance(q.shape, torch.Size) and q.dequantize().shape == (3, 4, 8)


U = "QuantizedTensor use"


def use_after(mutate: Callable[[QuantizedTensor], None], use: Callable[[QuantizedTensor], Any]) -> Callable[[], Any]:
    def call() -> Any:
        q = QuantizedTensor(**parts())
        mutate(q)
        return use(q)

    return call


def dequant(q: QuantizedTensor) -> Tensor:
    return q.dequantize()


bad("bits mutated, dequantize", U, use_after(lambda q: stale(q, bits=8), dequant), TypeError,
    "QuantizedTensor.qdata", ("int8",))
bad("group_size mutated, dequantize", U, use_after(lambda q: stale(q, group_size=2), dequant), ValueError,
    "QuantizedTensor.scales")
bad("group_size mutated to bool, dequantize", U, use_after(lambda q: stale(q, group_size=True), dequant),
    TypeError, "QuantizedTensor.group_size")
bad("shape mutated, dequantize", U, use_after(lambda q: stale(q, shape=torch.Size((3, 4, 10))), dequant),
    ValueError, "QuantizedTensor.qdata")
bad("scales resized in place, dequantize", U, use_after(lambda q: q.scales.resize_(12, 1), dequant), ValueError,
    "QuantizedTensor.scales")
bad("qdata transposed in place, dequantize", U, use_after(lambda q: q.qdata.t_(), dequant), ValueError,
    "QuantizedTensor.qdata")
bad("mutated, then indexed", U, use_after(lambda q: stale(q, group_size=2), lambda q: q[0]), ValueError,
    "QuantizedTensor.scales")
bad("mutated, then .to()", U, use_after(lambda q: stale(q, bits=8), lambda q: q.to("cpu")), TypeError,
    "QuantizedTensor.qdata")
bad("dequantize(int32)", U, use_after(lambda q: None, lambda q: q.dequantize(torch.int32)), TypeError, "dtype",
    ("floating",))
bad("dequantize('float16')", U, use_after(lambda q: None, lambda q: q.dequantize("float16")), TypeError, "dtype")
bad(".to(a dtype)", U, use_after(lambda q: None, lambda q: q.to(torch.float16)), TypeError, "device",
    ("dequantize",))

IDX = "QuantizedTensor[index]"
bad("index == size", IDX, use_after(lambda q: None, lambda q: q[3]), IndexError, "index", ("[-3, 3)",))
bad("index < -size", IDX, use_after(lambda q: None, lambda q: q[-4]), IndexError, "index", ("-4",))
bad("index 2**70", IDX, use_after(lambda q: None, lambda q: q[2**70]), IndexError, "index")
bad("index bool", IDX, use_after(lambda q: None, lambda q: q[True]), TypeError, "index", ("bool",))
bad("index float", IDX, use_after(lambda q: None, lambda q: q[1.0]), TypeError, "index")
bad("index tuple", IDX, use_after(lambda q: None, lambda q: q[0, 1]), TypeError, "index")
bad("index multi-element tensor", IDX, use_after(lambda q: None, lambda q: q[torch.tensor([0, 1])]), TypeError,
    "index")
bad("slice with step 2", IDX, use_after(lambda q: None, lambda q: q[::2]), ValueError, "index", ("step 1",))
bad("index a 1-D tensor", IDX, lambda: ops.quantize(torch.randn(8), 4, 4)[0], IndexError, "index", ("1-D",))


@corner("negative indices and slices follow Python", IDX)
def _():
    q = QuantizedTensor(**parts((5, 3, 8), 8, 4))
    dense = q.dequantize()
    for index in (0, 4, -1, -5, torch.tensor(2)):
        assert torch.equal(q[index].dequantize(), dense[index]), index
    for index in (slice(1, 4), slice(-2, None), slice(None), slice(3, 1), slice(-100, 100)):
        got = q[index]
        assert got.shape == dense[index].shape and torch.equal(got.dequantize(), dense[index]), index


# ============================================================================= library ops (torch.ops.flux)
L = "library ops"


def qrows(bits=4, group_size=4):
    return library.quantize_rows(torch.randn(4, 8, generator=gen(10)), bits, group_size)


bad("quantize_rows w 3-D", L, lambda: library.quantize_rows(torch.randn(2, 4, 8), 4, 4), ValueError, "w")
bad("quantize_rows w non-contiguous", L, lambda: library.quantize_rows(torch.randn(8, 4).t(), 4, 4), ValueError,
    "w", ("contiguous",))
bad("quantize_rows bits 5", L, lambda: qrows(bits=5), ValueError, "bits")
bad("quantize_rows group_size 0", L, lambda: qrows(group_size=0), ValueError, "group_size")
bad("dequantize_rows cols mismatch", L, lambda: library.dequantize_rows(*qrows(), 4, 4, 9, torch.float32),
    ValueError, "qdata", ("cols = 9",))
bad("dequantize_rows scales shape", L,
    lambda: library.dequantize_rows(qrows()[0], torch.ones(4, 3), 4, 4, 8, torch.float32), ValueError, "scales")
bad("dequantize_rows dtype int32", L, lambda: library.dequantize_rows(*qrows(), 4, 4, 8, torch.int32), TypeError,
    "dtype")
bad("dequantize_rows qdata dtype for bits", L, lambda: library.dequantize_rows(*qrows(), 8, 4, 8, torch.float32),
    TypeError, "qdata", ("int8",))
bad("dequantize_rows cols negative", L, lambda: library.dequantize_rows(*qrows(), 4, 4, -1, torch.float32),
    ValueError, "cols")
bad("dequantize_rows bits 3", L, lambda: library.dequantize_rows(*qrows(), 3, 4, 8, torch.float32), ValueError,
    "bits")


def rp_op(**override: Any) -> Callable[[], Any]:
    def call():
        g = gen(11)
        a = dict(x=torch.randn(4, 8, generator=g), gate=torch.randn(5, 8, generator=g), gate_scales=None,
                 gate_bits=0, group_size=1, top_k=2, scoring="softmax", renormalize=False,
                 counts=torch.zeros(5, dtype=torch.int64))
        a.update({k: (v() if callable(v) else v) for k, v in override.items()})
        return library.route_profile_op(**a)

    return call


def q_gate():
    return ops.quantize(torch.randn(5, 8, generator=gen(12)), 4, 4)


bad("route_profile_op gate_bits 3", L, rp_op(gate_bits=3), ValueError, "gate_bits")
bad("route_profile_op quantized gate without scales", L, rp_op(gate=lambda: q_gate().qdata, gate_bits=4,
                                                               group_size=4), ValueError, "gate_scales")
bad("route_profile_op dense gate with scales", L, rp_op(gate_scales=lambda: torch.ones(5, 2)), ValueError,
    "gate_scales")
bad("route_profile_op gate_scales shape", L, rp_op(gate=lambda: q_gate().qdata, gate_scales=lambda: torch.ones(5, 3),
                                                   gate_bits=4, group_size=4), ValueError, "gate_scales")
bad("route_profile_op top_k 0", L, rp_op(top_k=0), ValueError, "top_k")
bad("route_profile_op counts int32", L, rp_op(counts=lambda: torch.zeros(5, dtype=torch.int32)), TypeError, "counts")
bad("route_profile_op x non-contiguous", L, rp_op(x=lambda: torch.randn(8, 4).t()), ValueError, "x")


def fwd_op(**override: Any) -> Callable[[], Any]:
    def call():
        a = moe_args()
        a.update({"gate_up": [a["gate_up"]], "down": [a["down"]]})
        a.update({k: (v() if callable(v) else v) for k, v in override.items()})
        return library.merged_moe_fwd(a["x"], a["topk_ids"], a["topk_weights"], a["gate_up"], a["down"],
                                      a["expert_to_group"], a["activation"])

    return call


bad("merged_moe_fwd expert_to_group int64 2**32", L, fwd_op(expert_to_group=lambda: e2g64(2**32)), IndexError,
    "expert_to_group", ("4294967296",))
bad("merged_moe_fwd topk_ids out of range", L,
    fwd_op(topk_ids=lambda: torch.tensor([[0, 9], [1, 2]], dtype=torch.int32)), IndexError, "topk_ids")
bad("merged_moe_fwd x non-contiguous", L, fwd_op(x=lambda: torch.randn(8, 2).t()), ValueError, "x",
    ("contiguous",))
bad("merged_moe_fwd gate_up empty list", L, fwd_op(gate_up=[], down=[]), ValueError, "gate_up")


def bwd_op(**override: Any) -> Callable[[], Any]:
    def call():
        a = moe_args()
        x, w = a["x"], a["topk_weights"]
        gu, dn = [a["gate_up"]], [a["down"]]
        y, pre, pw, off, ss, pos = library.merged_moe_fwd(x, a["topk_ids"], w, gu, dn, a["expert_to_group"], "silu")
        b = dict(grad_y=torch.ones_like(y), x=x, topk_weights=w, gate_up=gu, down=dn, pre_act=pre, pair_weight=pw,
                 group_offsets=off, sorted_slot=ss, pair_of_slot=pos, activation="silu", need_grad_x=True,
                 need_grad_weights=True, need_grad_stacks=[True])
        b.update({k: (v(b) if callable(v) else v) for k, v in override.items()})
        return library.merged_moe_bwd(**b)

    return call


bad("merged_moe_bwd pre_act shape", L, bwd_op(pre_act=lambda b: b["pre_act"][:, :4].contiguous()), ValueError,
    "pre_act")
bad("merged_moe_bwd need_grad_stacks length", L, bwd_op(need_grad_stacks=[True, False]), ValueError,
    "need_grad_stacks")
bad("merged_moe_bwd grad_y shape", L, bwd_op(grad_y=lambda b: torch.ones(3, 8)), ValueError, "grad_y")
bad("merged_moe_bwd pair_weight dtype", L, bwd_op(pair_weight=lambda b: b["pair_weight"].double()), TypeError,
    "pair_weight")
bad("merged_moe_bwd group_offsets size", L, bwd_op(group_offsets=lambda b: b["group_offsets"][:2].contiguous()),
    ValueError, "group_offsets")

B = "backend selection"
bad("resolve unknown op", B, lambda: ops.resolve("nope", "cpu"), ValueError, "op", ("merged_moe_fwd",))
bad("resolve device_type not a str", B, lambda: ops.resolve("quantize", 3), TypeError, "device_type")
bad("use_backend unknown", B, lambda: ops.use_backend("fast").__enter__(), ValueError, "backend", ("reference",))


# ============================================================================= native kernels (cpp only)
N = "flux_C (native)"
CPP = ("cpp",)


def native(name: str, *args: Any) -> Callable[[], Any]:
    def call():
        import flux._C  # noqa: F401

        return getattr(torch.ops.flux_C, name)(*args)

    return call


def native_fwd(**override: Any) -> Callable[[], Any]:
    """torch.ops.flux_C.merged_moe_fwd on routing metadata with one field corrupted."""

    def call():
        import flux._C  # noqa: F401

        a = moe_args()
        off, ss, pos = library.backends.resolve("moe_routing", "cpu")[1].moe_routing(
            a["topk_ids"], a["expert_to_group"], 2)
        meta = dict(group_offsets=off, sorted_slot=ss, pair_of_slot=pos)
        meta.update({k: v(meta) for k, v in override.items()})
        return torch.ops.flux_C.merged_moe_fwd(a["x"], a["topk_weights"], [a["gate_up"]], [a["down"]],
                                               meta["group_offsets"], meta["sorted_slot"], meta["pair_of_slot"],
                                               "silu")

    return call


def corrupt(name: str, index: tuple, value: int) -> Callable[[dict], Tensor]:
    def make(meta: dict) -> Tensor:
        t = meta[name].clone()
        t[index] = value
        return t

    return make


bad("moe_routing topk_ids int64 2**32", N,
    native("moe_routing", ids64(2**32), torch.zeros(4, dtype=torch.int32), 1), IndexError, "topk_ids",
    backends=CPP)
bad("moe_routing expert_to_group int64 2**32", N,
    native("moe_routing", torch.zeros(2, 2, dtype=torch.int32), e2g64(2**32), 2), IndexError, "expert_to_group",
    backends=CPP)
bad("moe_routing num_groups 0", N, native("moe_routing", torch.zeros(2, 2, dtype=torch.int32),
                                          torch.zeros(4, dtype=torch.int32), 0), RuntimeError, "num_groups",
    backends=CPP)
bad("merged_moe_fwd pair_of_slot out of range", N, native_fwd(pair_of_slot=corrupt("pair_of_slot", (0, 0), 99)),
    IndexError, "pair_of_slot", backends=CPP)
bad("merged_moe_fwd sorted_slot out of range", N, native_fwd(sorted_slot=corrupt("sorted_slot", (0,), -7)),
    IndexError, "sorted_slot", backends=CPP)
bad("merged_moe_fwd group_offsets decreasing", N, native_fwd(group_offsets=corrupt("group_offsets", (1,), 2**40)),
    IndexError, "group_offsets", backends=CPP)
bad("dequantize scales shape", N, native("dequantize", torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 3), 4, 4,
                                         8, torch.float32), RuntimeError, "scales", backends=CPP)
bad("route_profile top_k 0", N, native("route_profile", torch.randn(2, 8), torch.randn(3, 8), None, 0, 1, 0,
                                       "softmax", False, torch.zeros(3, dtype=torch.int64)), RuntimeError, "top_k",
    backends=CPP)

# ============================================================================= harness self-test
# Not part of CASES: test_bad_inputs.py runs them to prove that a crash fails the named case and
# that the cases after it still run.
HARNESS_CASES = [
    Case("segfault", "harness", lambda: os.kill(os.getpid(), signal.SIGSEGV), None),
    Case("passes", "harness", lambda: None, None),
    Case("silent accept", "harness", lambda: None, ValueError, ("x",)),
    Case("unnamed", "harness", lambda: (_ for _ in ()).throw(ValueError("bad value")), ValueError, ("x",)),
]
BY_ID = {c.id: c for c in CASES + HARNESS_CASES}
assert len(BY_ID) == len(CASES) + len(HARNESS_CASES), "case ids (op: name) must be unique"


def names_argument(message: str, name: str) -> bool:
    """``name`` appears as a whole word (``gate`` does not match ``gate_up``)."""
    return re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", message) is not None


def run_case(case: Case, backend: str) -> dict[str, Any]:
    """-> {"status": pass | fail, "kind": clear | silent | wrong-type | unnamed | returned | error, ...}."""
    with ops.use_backend(backend):
        try:
            case.call()
        except Exception as exc:  # the outcome under test
            message = str(exc)
            record = {"exc_type": type(exc).__name__, "message": message[:600]}
            if case.exc is None:
                return {"status": "fail", "kind": "error", **record}
            if not isinstance(exc, case.exc):
                return {"status": "fail", "kind": "wrong-type", **record}
            missing = [n for n in case.names if not names_argument(message, n)]
            missing += [t for t in case.also if t not in message]
            if missing:
                return {"status": "fail", "kind": "unnamed", "missing": missing, **record}
            return {"status": "pass", "kind": "clear", **record}
    if case.exc is not None:
        return {"status": "fail", "kind": "silent"}
    return {"status": "pass", "kind": "returned"}


def main(backend: str) -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        name = line.rstrip("\n")
        if not name:
            continue
        print(json.dumps({"start": name}), flush=True)
        result = run_case(BY_ID[name], backend)
        print(json.dumps({"case": name, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
