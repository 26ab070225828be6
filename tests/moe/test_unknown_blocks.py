"""flux.patch never crashes on a recognised-but-unknown block (issue 13, part 2).

* experts whose activation is written inline in ``forward`` (no ``act_fn``): the activation is
  found by probing the expert; SiLU / exact GELU run natively, anything else falls back;
* structures the op cannot run (experts of different shapes, quantized-like projections, mixed
  biases, a gate whose output is not a top-k choice) keep the model's own code with a warning;
* what the caller states explicitly (adapters, adapter-declared activation names) is checked
  and a mistake there is an error.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flux
import flux.moe
from flux.moe.glu import KNOWN_ACTIVATIONS, probe_expert
from tests.moe.deepseek_v1 import DeepseekMoE, tiny_deepseek_v1
from tests.moe.helpers import assert_close, compare_models, histogram, input_ids, router_choices

INLINE = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),  # close to GELU, but not GELU
    "relu2": lambda z: F.relu(z).square(),
}
SUPPORTED = ("silu", "gelu")
NAMED_UNSUPPORTED = ("gelu_tanh", "relu")  # known to the probe, not run by flux.ops.merged_moe
UNKNOWN = ("quick_gelu", "relu2")


class InlineMLP(nn.Module):
    """An expert as remote code often writes it: ``down(F.silu(gate(x)) * up(x))`` with the
    activation inline, no ``act_fn`` / ``act`` attribute for an adapter to read."""

    def __init__(self, h: int, i: int, kind: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.kind = kind  # a str, not a callable: nothing to probe elementwise

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(INLINE[self.kind](self.gate_proj(x)) * self.up_proj(x))


def inline_deepseek(kind: str, **overrides):
    """tiny_deepseek_v1 with every routed expert replaced by an InlineMLP of the same weights."""
    model = tiny_deepseek_v1(**overrides)
    for block in model.modules():
        if isinstance(block, DeepseekMoE):
            for e, old in enumerate(block.experts):
                new = InlineMLP(old.hidden_size, old.intermediate_size, kind)
                new.load_state_dict(old.state_dict())
                block.experts[e] = new
    return model


def _patch_quietly(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a native layer warns about nothing
        return flux.patch(model, **kw)


# ---------------------------------------------------------------------------------- inline activations
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", SUPPORTED)
def test_inline_activation_runs_natively(kind, mode):
    model = inline_deepseek(kind)
    assert not hasattr(model.layers[1].mlp.experts[0], "act_fn")
    getattr(model, mode)()
    ref = copy.deepcopy(model)
    handle = _patch_quietly(model)
    assert [layer.name for layer in handle.moe_layers] == ["layers.1.mlp", "layers.2.mlp"]
    for layer in handle.moe_layers:
        assert layer.native and layer.source.activation == kind, layer.fallback_reason
    # eval: the remote code runs its experts under no_grad, so only outputs compare there
    compare_models(ref, model, input_ids(), grads=(mode == "train"))
    if mode == "train":
        assert model.layers[1].mlp.experts[0].gate_proj.weight.grad is not None


@pytest.mark.parametrize("kind", NAMED_UNSUPPORTED + UNKNOWN)
def test_inline_unsupported_activation_falls_back(kind):
    model = inline_deepseek(kind)
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="keeps its original forward") as record:
        handle = flux.patch(model)
    message = str(record[0].message)
    if kind in NAMED_UNSUPPORTED:  # the warning names what the probe found
        assert f"activation {kind}" in message and "not supported by flux.ops.merged_moe" in message
    else:
        assert "gives down(act(gate(x)) * up(x)) on the probe" in message
    assert all(not layer.native for layer in handle.moe_layers)
    assert all(layer.fallback_reason for layer in handle.moe_layers)
    with router_choices(model) as seen:
        compare_models(ref, model, input_ids())
        compare_models(ref, model, input_ids(1, batch=1, seq=5))
    for layer in handle.moe_layers:
        assert torch.equal(layer.counts, histogram(seen[layer.name + ".gate"], 6))
    with pytest.raises(NotImplementedError, match="falls back"):
        handle.moe_layers[0].install_merged_view(tuning=[0], clusters=[[1, 2, 3, 4, 5]])
    handle.restore()
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("hidden_act, named", [("gelu_pytorch_tanh", "gelu_tanh"), ("relu", "relu"),
                                               ("quick_gelu", None)])
def test_act_fn_attribute_fallback_names_the_activation(hidden_act, named):
    model = tiny_deepseek_v1(hidden_act=hidden_act)
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="keeps its original forward") as record:
        handle = flux.patch(model)
    message = str(record[0].message)
    assert (f"activation {named} (" in message) if named else "is none of silu, gelu, gelu_tanh, relu" in message
    assert not any(layer.native for layer in handle.moe_layers)
    compare_models(ref, model, input_ids())


def test_patch_probe_leaves_rng_and_weights_alone():
    model = inline_deepseek("gelu")
    before = [(p.dtype, p.data_ptr()) for p in model.parameters()]
    state = torch.get_rng_state()
    handle = _patch_quietly(model)
    assert torch.equal(torch.get_rng_state(), state)  # the probe draws from its own generator
    assert [(p.dtype, p.data_ptr()) for p in model.parameters()] == before
    handle.restore()


def test_dropout_inside_expert_is_not_mistaken_for_a_glu():
    """An expert with active dropout does not compute down(act(gate(x)) * up(x)) in training:
    the probe (run in the module's mode) sees that and the block keeps its code."""

    class DropoutMLP(InlineMLP):
        def __init__(self, h, i):
            super().__init__(h, i, "silu")
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.down_proj(self.drop(F.silu(self.gate_proj(x)) * self.up_proj(x)))

    model = tiny_deepseek_v1()
    for block in model.modules():
        if isinstance(block, DeepseekMoE):
            for e, old in enumerate(block.experts):
                new = DropoutMLP(old.hidden_size, old.intermediate_size)
                new.load_state_dict(old.state_dict())
                block.experts[e] = new
    model.train()
    with pytest.warns(RuntimeWarning, match="keeps its original forward"):
        handle = flux.patch(model)
    assert not any(layer.native for layer in handle.moe_layers)


# ---------------------------------------------------------------------------------- the probe itself
def _expert(kind: str, std: float, bias: bool = False, h: int = 48, i: int = 24, seed: int = 0) -> InlineMLP:
    torch.manual_seed(seed)
    expert = InlineMLP(h, i, kind, bias=bias)
    with torch.no_grad():
        for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
            lin.weight.normal_(0.0, std)
            if bias:
                lin.bias.normal_(0.0, std)
    return expert


def _projs(expert: InlineMLP):
    return expert.gate_proj, expert.up_proj, expert.down_proj


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("std", [1e-4, 0.02, 1.0])
@pytest.mark.parametrize("kind", list(INLINE))
def test_probe_expert_identifies_each_activation(kind, std, bias):
    expert = _expert(kind, std, bias)
    name, detail = probe_expert(expert, _projs(expert))
    assert name == (kind if kind in KNOWN_ACTIVATIONS else None), detail


def test_probe_tells_silu_from_gelu_on_tiny_weights():
    """SiLU and GELU agree to first order at 0 (both z/2): a probe on unit inputs through tiny
    weights sees nearly equal outputs.  The probe scales its input to the gate's pre-activations."""
    silu, gelu = _expert("silu", 1e-4), _expert("gelu", 1e-4)  # same seed: same weights
    x = torch.randn(16, 48)
    with torch.no_grad():
        a, b = silu(x), gelu(x)
    naive_gap = float((a - b).norm() / b.norm())
    assert naive_gap < 1e-3  # the trap: a naive comparison at float32-ish tolerances confuses them
    assert probe_expert(silu, _projs(silu))[0] == "silu"
    assert probe_expert(gelu, _projs(gelu))[0] == "gelu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(INLINE))
def test_probe_expert_native_precision(kind, dtype):
    """Without float64 (e.g. MPS) the expert runs in its own dtype, tolerance 8 eps of it: SiLU and
    GELU are always told apart; where GELU and tanh-GELU are not (half precision) the answer is
    'ambiguous', never a wrong name."""
    expert = _expert(kind, 0.05).to(dtype)
    name, detail = probe_expert(expert, _projs(expert), precisions=("native",))
    expected = kind if kind in KNOWN_ACTIVATIONS else None
    if dtype == torch.float32 or kind in ("silu", "relu", "relu2"):
        assert name == expected, detail
    else:  # the GELU family at 16 bits: right, or honestly ambiguous
        assert name in (expected, None) and (name == expected or "ambiguous" in detail), detail
        assert name not in ("silu", "relu")


def test_probe_expert_reports_what_it_cannot_probe():
    expert = _expert("silu", 0.02)
    with torch.no_grad():
        expert.gate_proj.weight.zero_()
    name, detail = probe_expert(expert, _projs(expert))
    assert name is None and "zero" in detail

    class TwoInputs(InlineMLP):
        def forward(self, x, scale):  # not an expert(x) forward
            return super().forward(x) * scale

    expert = TwoInputs(8, 4, "silu")
    name, detail = probe_expert(expert, _projs(expert))
    assert name is None and "raised TypeError" in detail
    with torch.device("meta"):
        expert = InlineMLP(8, 4, "silu")
    name, detail = probe_expert(expert, _projs(expert))
    assert name is None and "meta" in detail


# ---------------------------------------------------------------------------------- small blocks
class TopKGate(nn.Module):
    """Softmax top-k over linear logits; returns (ids, weights) (optionally dropped tokens as -1)."""

    def __init__(self, h: int, e: int, k: int, *, drop_below: float = 0.0, as_logits: bool = False) -> None:
        super().__init__()
        self.top_k = k
        self.weight = nn.Parameter(torch.randn(e, h) * 0.5)
        self.drop_below = drop_below
        self.as_logits = as_logits
        self.calls = 0

    def forward(self, x: Tensor):
        self.calls += 1
        logits = F.linear(x, self.weight)
        if self.as_logits:  # the caller does the top-k: not a top-k choice
            return (logits,)
        w, ids = logits.softmax(-1).topk(self.top_k, dim=-1)
        if self.drop_below > 0:  # capacity-style: dropped slots are -1 with weight 0
            dropped = w < self.drop_below
            ids = ids.masked_fill(dropped, -1)
            w = w.masked_fill(dropped, 0.0)
        return ids, w


class TopKBlock(nn.Module):
    """Experts loop, written like remote code; calls its gate on the block input itself."""

    def __init__(self, experts: list[nn.Module], gate: TopKGate) -> None:
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        out = self.gate(x)
        if self.gate.as_logits:
            w, ids = out[0].softmax(-1).topk(self.gate.top_k, dim=-1)
        else:
            ids, w = out
        x, ids, w = x.reshape(-1, shape[-1]), ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1])
        y = torch.zeros_like(x)
        for j in range(ids.shape[1]):
            for e, expert in enumerate(self.experts):
                m = ids[:, j] == e
                y[m] += w[m, j, None] * expert(x[m])
        return y.view(shape)


def _block(experts=None, h=16, i=8, e=4, k=2, seed=0, **gate_kw) -> TopKBlock:
    torch.manual_seed(seed)
    if experts is None:
        experts = [InlineMLP(h, i, "silu") for _ in range(e)]
    return TopKBlock(experts, TopKGate(h, len(experts), k, **gate_kw))


def _eager_compare(ref: nn.Module, model: nn.Module, x: Tensor) -> None:
    """Same output, input gradient and parameter gradients."""
    outs = []
    for m in (ref, model):
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)).sum().backward()
        outs.append((y, xx.grad))
    assert_close(outs[0][0], outs[1][0], "output")
    assert_close(outs[0][1], outs[1][1], "grad x")
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(p.grad, q.grad, f"grad of {name}")


def _gate_ids(ref: nn.Sequential, x: Tensor) -> Tensor:
    """The ids the unpatched copy's first gate picks for x (the patched gate's hook would count them)."""
    with torch.no_grad():
        ids, _ = ref[0].gate(x)
    ref[0].gate.calls -= 1
    return ids


def test_inline_block_with_biases_runs_natively():
    torch.manual_seed(0)
    model = nn.Sequential(_block([InlineMLP(16, 8, "gelu", bias=True) for _ in range(4)]))
    ref = copy.deepcopy(model)
    handle = _patch_quietly(model)
    assert handle.moe_layers[0].native and handle.moe_layers[0].source.activation == "gelu"
    _eager_compare(ref, model, torch.randn(3, 5, 16))


def test_experts_of_different_shapes_fall_back():
    torch.manual_seed(0)
    experts = [InlineMLP(16, 8, "silu"), InlineMLP(16, 12, "silu"), InlineMLP(16, 8, "silu")]
    model = nn.Sequential(_block(experts))
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="experts of different shapes"):
        handle = flux.patch(model)
    layer = handle.moe_layers[0]
    assert not layer.native
    x = torch.randn(3, 5, 16)
    _eager_compare(ref, model, x)
    assert torch.equal(layer.counts, histogram([_gate_ids(ref, x)], 3))
    w = layer.expert_weights(1)  # per-expert access still works, at that expert's size
    assert w.gate_up.shape == (24, 16) and w.down.shape == (16, 12)
    layer.set_expert_weights(1, w)
    handle.restore()


class HalfScaleLinear(nn.Linear):
    """A Linear subclass whose forward is not x @ weight.T (like a quantized / scaled layer)."""

    def forward(self, x):
        return F.linear(x, self.weight * 0.5, self.bias)


def test_projection_with_its_own_forward_falls_back():
    torch.manual_seed(0)
    experts = [InlineMLP(16, 8, "silu") for _ in range(4)]
    experts[2].up_proj = HalfScaleLinear(16, 8, bias=False)
    model = nn.Sequential(_block(experts))
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="HalfScaleLinear projection whose forward is not nn.Linear"):
        handle = flux.patch(model)
    assert not handle.moe_layers[0].native
    _eager_compare(ref, model, torch.randn(2, 7, 16))


def test_non_float_weights_fall_back():
    torch.manual_seed(0)
    model = nn.Sequential(_block())
    model[0].experts[1].up_proj.weight = nn.Parameter(torch.ones(8, 16, dtype=torch.int8), requires_grad=False)
    with pytest.warns(RuntimeWarning, match="torch.int8 tensor"):
        handle = flux.patch(model)
    assert not handle.moe_layers[0].native
    handle.restore()


def test_meta_weights_with_inline_activation_fall_back():
    """Nothing to probe on the meta device: a fallback (an act_fn attribute would still be probed)."""
    with torch.device("meta"):
        model = nn.Sequential(_block())
    with pytest.warns(RuntimeWarning, match="meta device"):
        handle = flux.patch(model)
    assert not handle.moe_layers[0].native
    handle.restore()


def test_mixed_biases_fall_back():
    torch.manual_seed(0)
    experts = [InlineMLP(16, 8, "silu") for _ in range(4)]
    experts[1].down_proj = nn.Linear(8, 16, bias=True)
    model = nn.Sequential(_block(experts))
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="mixes biased and unbiased"):
        handle = flux.patch(model)
    _eager_compare(ref, model, torch.randn(2, 7, 16))
    layer = handle.moe_layers[0]
    w = layer.expert_weights(1)  # the missing gate/up biases read as zeros
    assert torch.equal(w.gate_up_bias, torch.zeros(16)) and torch.equal(w.down_bias, experts[1].down_proj.bias)
    assert w.down_bias is not None and layer.expert_weights(0).down_bias is None
    layer.set_expert_weights(1, w)


@pytest.mark.parametrize("gate_kw, problem", [
    ({"as_logits": True}, "expected top-k indices and weights"),
    ({"drop_below": 0.3}, "outside [0, 4)"),
], ids=["logits", "dropped_slots"])
def test_gate_output_that_is_not_a_topk_choice_falls_back(gate_kw, problem):
    model = nn.Sequential(_block(**gate_kw), _block(seed=1, **gate_kw))
    ref = copy.deepcopy(model)
    handle = _patch_quietly(model)  # nothing to see before a forward
    assert all(layer.native for layer in handle.moe_layers)
    x = torch.randn(3, 5, 16)
    with pytest.warns(RuntimeWarning, match="runs its original forward from now on") as record:
        _eager_compare(ref, model, x)
    assert len(record) == 2 and problem in str(record[0].message)
    # the first call replayed the gate output into the block's own forward: the gate ran once
    assert [b.gate.calls for b in model] == [b.gate.calls for b in ref] == [1, 1]
    assert all(not layer.native and "not a top-k choice" in layer.fallback_reason for layer in handle.moe_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # demoted once, quiet afterwards
        _eager_compare(ref, model, torch.randn(2, 3, 16))
    handle.restore()
    assert all("forward" not in b.__dict__ for b in model)


def test_gate_problem_with_a_merged_view_is_an_error():
    """A view the user installed cannot be served by the block's own code: say so, do not
    silently run the original experts."""
    model = nn.Sequential(_block(as_logits=True))
    handle = _patch_quietly(model)
    handle.moe_layers[0].install_merged_view(tuning=[0], clusters=[[1, 2, 3]])
    with pytest.raises(flux.moe.GateOutputError, match="merged view is installed"):
        model(torch.randn(2, 3, 16))
    handle.restore()


def test_counts_skip_dropped_slots_on_a_fallback_layer():
    torch.manual_seed(0)
    model = nn.Sequential(_block([InlineMLP(16, 8, "relu2") for _ in range(4)], drop_below=0.3))
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="keeps its original forward"):
        handle = flux.patch(model)
    x = torch.randn(4, 6, 16)
    ids = _gate_ids(ref, x)
    assert (ids == -1).any()
    _eager_compare(ref, model, x)
    assert torch.equal(handle.moe_layers[0].counts, histogram([ids[ids >= 0]], 4))


# ---------------------------------------------------------------------------------- explicit mistakes
class InlineAdapter(flux.moe.ModuleListAdapter):
    """An adapter that states its blocks' activation by name."""

    name = "inline_test"
    stated = "gelu"

    def match(self, module):
        return isinstance(module, TopKBlock) and super().match(module)

    def activation(self, block, expert):
        return self.stated


def test_adapter_stated_activation():
    model = nn.Sequential(_block([InlineMLP(16, 8, "gelu") for _ in range(4)]))
    ref = copy.deepcopy(model)
    handle = _patch_quietly(model, adapters=[InlineAdapter()])
    assert handle.moe_layers[0].native and handle.moe_layers[0].source.activation == "gelu"
    _eager_compare(ref, model, torch.randn(2, 5, 16))
    handle.restore()

    relu = InlineAdapter()
    relu.stated = "relu"  # known, not run by the kernel: a fallback that names it
    with pytest.warns(RuntimeWarning, match="activation relu"):
        handle = flux.patch(model, adapters=[relu])
    assert not handle.moe_layers[0].native
    handle.restore()

    typo = InlineAdapter()
    typo.stated = "swiglu"  # stated explicitly and unknown: the adapter author's mistake
    with pytest.raises(ValueError, match="returned 'swiglu'"):
        flux.patch(model, adapters=[typo])
    assert flux.moe.get_handle(model) is None and "forward" not in model[0].__dict__


def test_explicit_adapters_are_checked():
    model = nn.Sequential(_block())
    with pytest.raises(TypeError, match="lacks match"):
        flux.patch(model, adapters=[object()])
    with pytest.raises(TypeError, match="lacks"):
        flux.moe.register_adapter(object())
