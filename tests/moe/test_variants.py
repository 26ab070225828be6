"""Experts-interface variants: transposed, interleaved gate/up, biased, GELU (native), and layouts
the op cannot express (fallback to transformers' own implementation)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

import flux
from tests.moe.helpers import assert_close, compare_models, input_ids, step

E, H, I, K, T = 5, 24, 12, 2, 13


def _experts_class(transposed: bool, interleaved: bool, bias: bool, gate: str = "default", has_gate: bool = True):
    @use_experts_implementation(is_transposed=transposed, is_concatenated=not interleaved, has_bias=bias, has_gate=has_gate)
    class SyntheticExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            proj = 2 * I if has_gate else I
            name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, name, nn.Parameter(torch.randn(E, H, proj) / 4 if transposed else torch.randn(E, proj, H) / 4))
            self.down_proj = nn.Parameter(torch.randn(E, I, H) / 4 if transposed else torch.randn(E, H, I) / 4)
            if bias:
                setattr(self, name + "_bias", nn.Parameter(torch.randn(E, proj) / 4))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H) / 4)
            self.act_fn = ACT2FN[config.hidden_act]

        if gate == "interleaved":
            def _apply_gate(self, gate_up):
                return self.act_fn(gate_up[..., 0::2]) * gate_up[..., 1::2]
        elif gate == "clamped":
            def _apply_gate(self, gate_up):
                g, u = gate_up.chunk(2, dim=-1)
                return self.act_fn(g.clamp(max=3.0)) * u.clamp(-3.0, 3.0)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            """Eager reference: every (token, slot) pair on its own."""
            k = top_k_index.shape[1]
            x = hidden_states.repeat_interleave(k, dim=0)
            e = top_k_index.reshape(-1)
            up = self.gate_up_proj if has_gate else self.up_proj
            w1 = up[e] if transposed else up[e].transpose(1, 2)
            h = torch.bmm(x.unsqueeze(1), w1).squeeze(1)
            if bias:
                h = h + (self.gate_up_proj_bias if has_gate else self.up_proj_bias)[e]
            a = self._apply_gate(h) if has_gate else self.act_fn(h)
            w2 = self.down_proj[e] if transposed else self.down_proj[e].transpose(1, 2)
            y = torch.bmm(a.unsqueeze(1), w2).squeeze(1)
            if bias:
                y = y + self.down_proj_bias[e]
            y = y * top_k_weights.reshape(-1, 1)
            return y.view(-1, k, H).sum(1)

    return SyntheticExperts


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.top_k = K
        self.weight = nn.Parameter(torch.randn(E, H) / 3)

    def forward(self, x):
        logits = x @ self.weight.t()
        w, ids = torch.topk(logits.softmax(-1), K, dim=-1)
        return logits, w, ids


class Block(nn.Module):
    def __init__(self, experts_cls, config):
        super().__init__()
        self.gate = Router()
        self.experts = experts_cls(config)

    def forward(self, x):
        _, w, ids = self.gate(x)
        return self.experts(x, ids, w)


def _block(act="silu", **kw):
    torch.manual_seed(0)
    config = PretrainedConfig(hidden_act=act)
    config._experts_implementation = "eager"
    return nn.Sequential(Block(_experts_class(**kw), config))


def _canonical(experts, e, transposed, interleaved):
    """Expert e as (gate_up [2I, H], down [H, I], b1, b2), extracted independently of flux."""
    gu = experts.gate_up_proj[e]
    dn = experts.down_proj[e]
    if transposed:
        gu, dn = gu.t(), dn.t()
    b1 = experts.gate_up_proj_bias[e] if hasattr(experts, "gate_up_proj_bias") else None
    if interleaved:
        gu = torch.cat((gu[0::2], gu[1::2]))
        b1 = None if b1 is None else torch.cat((b1[0::2], b1[1::2]))
    b2 = experts.down_proj_bias[e] if hasattr(experts, "down_proj_bias") else None
    return gu, dn, b1, b2


def _run(model, x):
    for p in model.parameters():
        p.grad = None
    xx = x.clone().requires_grad_(True)
    y = model(xx)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, xx.grad


VARIANTS = {
    "plain": dict(transposed=False, interleaved=False, bias=False),
    "gelu": dict(transposed=False, interleaved=False, bias=False, act="gelu"),
    "transposed": dict(transposed=True, interleaved=False, bias=False),
    "interleaved": dict(transposed=False, interleaved=True, bias=False, gate="interleaved"),
    "biased": dict(transposed=False, interleaved=False, bias=True),
    "transposed_interleaved_biased_gelu": dict(transposed=True, interleaved=True, bias=True, gate="interleaved", act="gelu"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_native_variant_matches_eager(variant):
    kw = dict(VARIANTS[variant])
    act = kw.pop("act", "silu")
    model = _block(act, **kw)
    ref = copy.deepcopy(model)
    handle = flux.patch(model)
    layer = handle.moe_layers[0]
    assert layer.native, layer.fallback_reason
    assert layer.source.activation == act
    x = torch.randn(T, H)
    y_ref, gx_ref = _run(ref, x)
    y, gx = _run(model, x)
    assert_close(y_ref, y, "output")
    assert_close(gx_ref, gx, "grad x")
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert_close(p.grad, q.grad, f"grad of {name}")
    # expert weights by original index, canonical layout; writes land in the native layout
    experts = model[0].experts
    for e in range(E):
        gu, dn, b1, b2 = _canonical(experts, e, kw["transposed"], kw["interleaved"])
        w = layer.expert_weights(e)
        assert torch.equal(w.gate_up, gu) and torch.equal(w.down, dn)
        if kw["bias"]:
            assert torch.equal(w.gate_up_bias, b1) and torch.equal(w.down_bias, b2)
    new = layer.expert_weights(1)
    new = type(new)(new.gate_up * 2, new.down + 1, None if new.gate_up_bias is None else new.gate_up_bias - 1,
                    None if new.down_bias is None else new.down_bias * 3)
    layer.set_expert_weights(1, new)
    gu, dn, b1, b2 = _canonical(experts, 1, kw["transposed"], kw["interleaved"])
    assert torch.equal(gu, new.gate_up) and torch.equal(dn, new.down)
    if kw["bias"]:
        assert torch.equal(b1, new.gate_up_bias) and torch.equal(b2, new.down_bias)


@pytest.mark.parametrize("variant", ["biased", "transposed_interleaved_biased_gelu"])
def test_merged_view_on_biased_variant(variant):
    kw = dict(VARIANTS[variant])
    act = kw.pop("act", "silu")
    model = _block(act, **kw)
    layer = flux.patch(model).moe_layers[0]
    experts = model[0].experts
    canon = [_canonical(experts, e, kw["transposed"], kw["interleaved"]) for e in range(E)]
    view = layer.install_merged_view(tuning=[3], clusters=[[0, 2], [4]], drop=[1], weights=[1.0, 1.0, 3.0, 1.0, 1.0])
    x = torch.randn(T, H)
    _, w, ids = model[0].gate(x)
    # hand-computed: each expert replaced by its group's weights (weighted average), dropped -> 0
    groups = {3: [(3, 1.0)], 0: [(0, 0.25), (2, 0.75)], 2: [(0, 0.25), (2, 0.75)], 4: [(4, 1.0)]}
    fn = torch.nn.functional.silu if act == "silu" else torch.nn.functional.gelu
    expected = torch.zeros(T, H)
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            if e == 1:
                continue
            parts = [(a, canon[m]) for m, a in groups[e]]
            gu = sum(a * c[0] for a, c in parts)
            dn = sum(a * c[1] for a, c in parts)
            b1 = sum(a * c[2] for a, c in parts)
            b2 = sum(a * c[3] for a, c in parts)
            h = gu @ x[t] + b1
            expected[t] += w[t, j] * (dn @ (fn(h[:I]) * h[I:]) + b2)
    with torch.no_grad():
        y = model(x)
    assert_close(expected, y.detach(), "merged view output")
    assert view.tuned_gate_up_bias is not None and view.tuned_gate_up_bias.requires_grad


def _fallback_block(**kw):
    act = kw.pop("act", "silu")
    return _block(act, **kw)


@pytest.mark.parametrize("variant,reason", [
    (dict(transposed=False, interleaved=False, bias=False, act="gelu_pytorch_tanh"), "_apply_gate"),
    (dict(transposed=True, interleaved=False, bias=True, gate="clamped"), "_apply_gate"),
    (dict(transposed=False, interleaved=False, bias=False, has_gate=False, act="relu2"), "has_gate=False"),
], ids=["tanh_gelu", "clamped_swiglu", "no_gate_relu2"])
def test_fallback_variant(variant, reason):
    model = _fallback_block(**variant)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = flux.patch(model)
    layer = handle.moe_layers[0]
    assert not layer.native and reason in layer.fallback_reason
    assert any("runs its original experts implementation" in str(w.message) for w in caught)
    x = torch.randn(T, H)
    y_ref, gx_ref = _run(ref, x)
    y, gx = _run(model, x)
    assert_close(y_ref, y, "output")
    assert_close(gx_ref, gx, "grad x")
    _, _, ids = model[0].gate(x)
    assert torch.equal(layer.counts, torch.bincount(ids.flatten(), minlength=E))
    if variant.get("has_gate", True):  # gated fallbacks take views through their own code
        _check_fallback_view(model, ref, layer, x)
    else:
        with pytest.raises(NotImplementedError, match="falls back"):
            layer.install_merged_view(tuning=[0], clusters=[[1, 2, 3, 4]])
    handle.restore()


def _hand_merge(experts, tuning, clusters, drop, alpha):
    """Merge in the module's native layout (a weighted average commutes with any layout)."""
    names = [n for n in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias") if hasattr(experts, n)]
    with torch.no_grad():
        for members in clusters:
            a = torch.tensor([alpha[m] for m in members], dtype=torch.float64)
            a = (a / a.sum()).tolist()
            for n in names:
                p = getattr(experts, n)
                merged = sum(w * p[m].double() for w, m in zip(a, members)).to(p.dtype)
                for m in members:
                    p[m] = merged
        for d in drop:
            for n in names:
                getattr(experts, n)[d] = 0


def _check_fallback_view(model, ref, layer, x):
    plan = dict(tuning=[3], clusters=[[0, 2], [4]], drop=[1])
    alpha = [1.0, 1.0, 3.0, 1.0, 2.0]
    hand = copy.deepcopy(ref)
    _hand_merge(hand[0].experts, **plan, alpha=alpha)
    view = layer.install_merged_view(**plan, weights=alpha)
    y_hand, _ = _run(hand, x)
    y, _ = _run(model, x)
    assert_close(y_hand, y, "fallback merged view output")
    g = hand[0].experts.gate_up_proj.grad[3]
    got = view.tuned_gate_up.grad[0]
    got = layer.source._interleave(got, 0)
    assert_close(g, got.t() if layer.source.is_transposed else got, "tuned expert grad")
    assert all(p.grad is None for p in layer.source.expert_parameters())
    layer.remove_view()


def test_gpt_oss_falls_back_with_identical_results():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GptOssForCausalLM(GptOssConfig(
            hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64, initializer_range=0.1,
            layer_types=["full_attention"] * 2)).float().train()
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="GptOssExperts"):
        handle = flux.patch(model)
    assert [layer.native for layer in handle.moe_layers] == [False, False]
    compare_models(ref, model, input_ids())
    assert all(int(layer.counts.sum()) == 2 * 9 * 2 for layer in handle.moe_layers)
    # expert weights in the canonical layout: [gate; up] rows (GPT-OSS stores them interleaved, transposed)
    native = model.model.layers[0].mlp.experts.gate_up_proj[1]
    w = handle.moe_layers[0].expert_weights(1).gate_up
    assert torch.equal(w[:16], native[:, 0::2].t()) and torch.equal(w[16:], native[:, 1::2].t())
    # a merged view runs through GPT-OSS's own implementation: equal to the hand-merged model
    hand = copy.deepcopy(ref)
    plans = [dict(tuning=[0], clusters=[[1, 3]], drop=[2]), dict(tuning=[2, 3], clusters=[[0, 1]], drop=[])]
    for layer, hand_layer, plan in zip(handle.moe_layers, hand.model.layers, plans):
        _hand_merge(hand_layer.mlp.experts, **plan, alpha=[1.0] * 4)
        layer.install_merged_view(**plan, quantize_bits=None)
    compare_models(hand, model, input_ids(1), grads=False)
    zero = [p for p in model.parameters() if p.grad is not None]
    for p in zero:
        p.grad = None
    step(model, input_ids(1))
    assert handle.moe_layers[1].view.tuned_gate_up.grad is not None


def test_aria_transposed_family_native():
    from transformers import AriaTextConfig, AriaTextForCausalLM

    torch.manual_seed(0)
    model = AriaTextForCausalLM(AriaTextConfig(
        hidden_size=32, intermediate_size=16, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
        initializer_range=0.1)).float().train()
    ref = copy.deepcopy(model)
    handle = flux.patch(model)
    assert all(layer.native and layer.source.is_transposed for layer in handle.moe_layers)
    compare_models(ref, model, input_ids())
