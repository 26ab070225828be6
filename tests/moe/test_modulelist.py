"""ModuleList MoE blocks (DeepSeek-MoE v1 / LLaMA-MoE style remote code) and the adapter registry."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import flux
import flux.moe
from tests.moe.deepseek_v1 import DeepseekV1ForCausalLM, tiny_deepseek_v1
from tests.moe.helpers import assert_close, compare_models, histogram, input_ids, router_choices, step


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("overrides", [{}, {"norm_topk_prob": True, "hidden_act": "gelu", "n_shared_experts": None}],
                         ids=["softmax_shared", "normed_gelu_noshared"])
def test_deepseek_v1_matches_unpatched(mode, overrides):
    model = tiny_deepseek_v1(**overrides)
    getattr(model, mode)()
    ref = copy.deepcopy(model)
    handle = flux.patch(model)
    assert [layer.name for layer in handle.moe_layers] == ["layers.1.mlp", "layers.2.mlp"]  # layer 0 is dense
    layer = handle.moe_layers[0]
    assert layer.kind == "modulelist:modulelist_glu" and layer.native
    assert (layer.num_experts, layer.top_k, layer.hidden_size, layer.intermediate_size) == (6, 2, 32, 16)
    assert layer.router is model.layers[1].mlp.gate
    # train mode includes the aux-loss gradient path; in eval mode the remote code runs the
    # routed experts under torch.no_grad (moe_infer), so only outputs are comparable there
    compare_models(ref, model, input_ids(), grads=(mode == "train"))
    if overrides == {} and mode == "train":
        assert model.layers[1].mlp.shared_experts.gate_proj.weight.grad is not None


def test_deepseek_v1_counts_restore_and_checkpoint(tmp_path):
    model = tiny_deepseek_v1()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    handle = flux.patch(model)
    with router_choices(model) as seen:
        step(model, input_ids())
        step(model, input_ids(1, batch=1, seq=4))
    for layer in handle.moe_layers:
        assert torch.equal(layer.counts, histogram(seen[layer.name + ".gate"], 6))
    # weights by original index are the expert MLP's own weights
    w = handle.moe_layers[1].expert_weights(4)
    mlp = model.layers[2].mlp.experts[4]
    assert torch.equal(w.gate_up, torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight))) and torch.equal(w.down, mlp.down_proj.weight)
    # save_pretrained: same files and tensors as the unpatched model
    ref.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    loaded = DeepseekV1ForCausalLM.from_pretrained(tmp_path / "b").float().train()
    handle.restore()
    assert list(model.state_dict()) == keys
    assert "forward" not in model.layers[1].mlp.__dict__
    assert not hasattr(model.layers[1].mlp, "flux_counts")
    # after 2 patched steps without an optimizer the weights are unchanged: same as ref
    compare_models(ref, model, input_ids(2))
    compare_models(ref, loaded, input_ids(3))


class LlamaMLP(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DictGate(nn.Module):
    """LLaMA-MoE style gate: returns a dict with topK_indices / topK_scores / balance_loss."""

    def __init__(self, h, e, k):
        super().__init__()
        self.num_selects = k
        self.top_k = k
        self.gate_network = nn.Linear(h, e, bias=False)

    def forward(self, x):
        logits = self.gate_network(x)
        scores, idx = logits.topk(self.top_k, dim=-1)
        scores = scores.softmax(-1)
        return {"topK_indices": idx, "topK_scores": scores, "balance_loss": logits.pow(2).mean(), "load": None}


class DictGateBlock(nn.Module):
    def __init__(self, h=16, i=8, e=4, k=2):
        super().__init__()
        self.gate = DictGate(h, e, k)
        self.experts = nn.ModuleList([LlamaMLP(h, i) for _ in range(e)])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        g = self.gate(x)
        y = torch.zeros_like(x)
        for j in range(g["topK_indices"].shape[1]):
            for e, expert in enumerate(self.experts):
                mask = g["topK_indices"][:, j] == e
                y[mask] += g["topK_scores"][mask, j, None] * expert(x[mask])
        return y.view(shape)


def _xgrad_compare(ref, model, x):
    outs = []
    for m in (ref, model):
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)).sum().backward()
        outs.append((y, xx.grad))
    assert_close(outs[0][0], outs[1][0], "output")
    assert_close(outs[0][1], outs[1][1], "grad x")
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert_close(p.grad, q.grad, f"grad of {name}")


def test_llama_moe_style_dict_gate():
    torch.manual_seed(0)
    model = nn.Sequential(DictGateBlock(), DictGateBlock())
    ref = copy.deepcopy(model)
    handle = flux.patch(model)
    assert len(handle.moe_layers) == 2
    _xgrad_compare(ref, model, torch.randn(3, 5, 16))
    assert handle.moe_layers[0].last_aux_loss is not None  # the balance loss is kept for the caller


class MixtralV4Block(nn.Module):
    """transformers 4.x Mixtral layout: a Linear router returning logits, experts with w1/w3/w2."""

    def __init__(self, h=16, i=8, e=4, k=2):
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList([nn.Module() for _ in range(e)])
        for ex in self.experts:
            ex.w1, ex.w3, ex.w2 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)
            ex.act_fn = nn.SiLU()

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, ids = torch.topk(F.softmax(self.gate(x), dim=-1, dtype=torch.float), self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(self.top_k):
                ex = self.experts[int(ids[t, j])]
                y[t] += w[t, j] * ex.w2(ex.act_fn(ex.w1(x[t])) * ex.w3(x[t]))
        return y.view(shape)


class MixtralV4Adapter(flux.moe.ModuleListAdapter):
    name = "mixtral_v4_test"
    projection_names = ("w1", "w3", "w2")

    def match(self, module):
        return isinstance(module, MixtralV4Block) and super().match(module)

    def gate_is_router(self, gate):
        return True

    def route(self, block, hidden_states, *args, **kwargs):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        w, ids = torch.topk(F.softmax(block.gate(x), dim=-1, dtype=torch.float), block.top_k, dim=-1)
        return flux.moe.Routing(ids, w / w.sum(-1, keepdim=True))


def test_register_adapter_for_other_layout():
    torch.manual_seed(0)
    model = nn.Sequential(MixtralV4Block(), nn.LayerNorm(16), MixtralV4Block())
    with pytest.raises(ValueError, match="no MoE layer"):
        flux.patch(model)  # a Linear gate returns logits: not matched by the built-in adapter
    ref = copy.deepcopy(model)
    flux.moe.register_adapter(MixtralV4Adapter())
    try:
        assert flux.moe.registered_adapters()[0].name == "mixtral_v4_test"
        handle = flux.patch(model)
        assert [layer.kind for layer in handle.moe_layers] == ["modulelist:mixtral_v4_test"] * 2
        _xgrad_compare(ref, model, torch.randn(2, 3, 16))
        view = handle.moe_layers[0].install_merged_view(tuning=[1], clusters=[[0, 2, 3]])
        assert view.num_tuned == 1
        handle.restore()
        assert "forward" not in model[0].__dict__
    finally:
        flux.moe.unregister_adapter("mixtral_v4_test")
    assert all(a.name != "mixtral_v4_test" for a in flux.moe.registered_adapters())


def test_unsupported_activation_keeps_forward_and_counts():
    torch.manual_seed(0)
    model = tiny_deepseek_v1(hidden_act="relu")
    ref = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="keeps its original forward"):
        handle = flux.patch(model)
    assert not any(layer.native for layer in handle.moe_layers)
    with router_choices(model) as seen:
        compare_models(ref, model, input_ids())
    for layer in handle.moe_layers:
        assert torch.equal(layer.counts, histogram(seen[layer.name + ".gate"], 6))
    handle.restore()
    assert all(not m._forward_hooks for m in model.modules())
