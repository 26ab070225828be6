"""Merged-expert views: equal to a hand-merged model, frozen groups untouched, read-back,
quantized frozen groups, released originals, and clear errors for bad layouts."""
from __future__ import annotations

import copy

import pytest
import torch

import flux
import flux.ops
from flux.moe import ExpertWeights, LayoutError, LayoutIndexError
from tests.moe.deepseek_v1 import tiny_deepseek_v1
from tests.moe.helpers import (
    assert_close,
    input_ids,
    step,
    tiny_deepseek_v3,
    tiny_mixtral,
    tiny_qwen2_moe,
    zero_grads,
)


# ----------------------------------------------------------------------------- hand-written access
def _experts_of(model, layer):
    """(read(e) -> (gate_up [2I,H], down [H,I]), write(e, gate_up, down)) straight on the model."""
    module = dict(model.named_modules())[layer.name]
    if hasattr(module, "gate_up_proj"):
        def read(e):
            return module.gate_up_proj[e].detach().clone(), module.down_proj[e].detach().clone()

        def write(e, gu, dn):
            with torch.no_grad():
                module.gate_up_proj[e].copy_(gu)
                module.down_proj[e].copy_(dn)

        def grad(e):
            return torch.cat((module.gate_up_proj.grad[e].flatten(), module.down_proj.grad[e].flatten()))
    else:
        def read(e):
            m = module.experts[e]
            return torch.cat((m.gate_proj.weight, m.up_proj.weight)).detach().clone(), m.down_proj.weight.detach().clone()

        def write(e, gu, dn):
            m = module.experts[e]
            i = gu.shape[0] // 2
            with torch.no_grad():
                m.gate_proj.weight.copy_(gu[:i])
                m.up_proj.weight.copy_(gu[i:])
                m.down_proj.weight.copy_(dn)

        def grad(e):
            m = module.experts[e]
            return torch.cat((m.gate_proj.weight.grad.flatten(), m.up_proj.weight.grad.flatten(),
                              m.down_proj.weight.grad.flatten()))
    return read, write, grad


def _layout(num_experts, seed):
    """tuning, clusters, drop, alpha for a layer with num_experts experts."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_experts, generator=gen).tolist()
    tuning, rest = perm[:2], perm[2:]
    drop = rest[:1]
    rest = rest[1:]
    half = max(1, len(rest) // 2)
    clusters = [rest[:half], rest[half:]] if len(rest) > 1 else [rest]
    alpha = (torch.rand(num_experts, generator=gen) + 0.2).tolist()
    return tuning, [c for c in clusters if c], drop, alpha


BUILDERS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "deepseek_v3": tiny_deepseek_v3,
            "deepseek_v1": tiny_deepseek_v1}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_merged_view_equals_hand_merged_model(family):
    model = BUILDERS[family]()
    hand = copy.deepcopy(model)
    handle = flux.patch(model)
    plan = []
    for layer in handle.moe_layers:
        tuning, clusters, drop, alpha = _layout(layer.num_experts, layer.index)
        read, write, _ = _experts_of(hand, layer)
        original = {e: read(e) for e in range(layer.num_experts)}
        # the hand-merged model: every expert carries its group's weights, dropped experts zeros
        for members in clusters:
            a = torch.tensor([alpha[m] for m in members], dtype=torch.float64)
            a = a / a.sum()
            gu = sum(float(w) * original[m][0].double() for w, m in zip(a, members)).float()
            dn = sum(float(w) * original[m][1].double() for w, m in zip(a, members)).float()
            for m in members:
                write(m, gu, dn)
        for d in drop:
            write(d, torch.zeros_like(original[d][0]), torch.zeros_like(original[d][1]))
        view = layer.install_merged_view(tuning, clusters, weights=alpha, drop=drop)
        assert view.num_tuned == 2 and view.num_frozen == len(clusters) and view.dropped_experts == drop
        assert sorted(view.tuned_experts) == sorted(tuning)
        plan.append((layer, tuning, clusters))
    zero_grads(model)
    zero_grads(hand)
    ids = input_ids(7)
    out_hand, out = step(hand, ids), step(model, ids)
    assert_close(out_hand.logits, out.logits, "logits")
    assert_close(out_hand.loss, out.loss, "loss")
    expert_param_ids = {id(p) for layer in handle.moe_layers for p in layer.source.expert_parameters()}
    hand_params = dict(hand.named_parameters())
    for name, p in model.named_parameters():
        if "flux_view" in name:
            continue
        if id(p) in expert_param_ids:
            assert p.grad is None, f"{name}: original experts are not used under a view"
        elif p.grad is not None or hand_params[name].grad is not None:
            assert_close(hand_params[name].grad, p.grad, f"grad of {name}")  # routers, attention, shared experts
    for layer, tuning, clusters in plan:
        _, _, grad = _experts_of(hand, layer)
        view = layer.view
        for e in tuning:
            i = view._internal[view.expert_to_group[e]]
            got = torch.cat((view.tuned_gate_up.grad[i].flatten(), view.tuned_down.grad[i].flatten()))
            if family == "deepseek_v1":
                inter = layer.intermediate_size
                g = view.tuned_gate_up.grad[i]
                got = torch.cat((g[:inter].flatten(), g[inter:].flatten(), view.tuned_down.grad[i].flatten()))
            assert_close(grad(e), got, f"{layer.name}: grad of tuning expert {e}")
        # frozen groups: buffers, no gradient
        assert not view.frozen_gate_up.requires_grad and view.frozen_gate_up.grad is None
        assert [p.shape[0] for p in view.trainable_parameters()] == [2, 2]


def test_train_read_back_and_remove_view_writes_back(tmp_path):
    model = tiny_mixtral()
    keys = list(model.state_dict())
    handle = flux.patch(model)
    originals = [{e: layer.expert_weights(e).gate_up.clone() for e in range(4)} for layer in handle.moe_layers]
    for layer in handle.moe_layers:
        layer.install_merged_view(tuning=[1, 3], clusters=[[0, 2]])
    trainable = handle.trainable_parameters()
    assert len(trainable) == 4 and all(any(p is q for q in model.parameters()) for p in trainable)
    assert list(model.state_dict()) == keys  # checkpoints keep the original format
    opt = torch.optim.SGD(trainable, lr=0.5)
    for s in range(3):
        opt.zero_grad()
        step(model, input_ids(s))
        opt.step()
    for layer, orig in zip(handle.moe_layers, originals):
        tuned = layer.tuned_weights()
        assert sorted(tuned) == [1, 3]
        for e in (1, 3):
            assert not torch.equal(tuned[e].gate_up, orig[e])  # trained
            assert torch.equal(layer.expert_weights(e).gate_up, tuned[e].gate_up)  # read back by original index
            assert torch.equal(layer.source.expert(e).gate_up, orig[e])  # originals untouched meanwhile
        assert torch.equal(layer.expert_weights(0).gate_up, orig[0])
    trained = [layer.tuned_weights() for layer in handle.moe_layers]
    with torch.no_grad():
        viewed = model(input_ids(9), use_cache=False).logits
    handle.remove_views()
    for layer, orig, tw in zip(handle.moe_layers, originals, trained):
        assert layer.view is None
        for e in range(4):
            expected = tw[e].gate_up if e in (1, 3) else orig[e]
            assert torch.equal(layer.expert_weights(e).gate_up, expected)
    assert list(model.state_dict()) == keys
    # full layout again, with experts 1 and 3 trained: differs from the view only through 0/2 merging
    with torch.no_grad():
        full = model(input_ids(9), use_cache=False).logits
    assert not torch.allclose(full, viewed)


def test_quantized_frozen_groups_match_dequantized_weights():
    model = tiny_qwen2_moe()
    dense_model = copy.deepcopy(model)
    handle, dense = flux.patch(model), flux.patch(dense_model)
    for layer, dlayer in zip(handle.moe_layers, dense.moe_layers):
        layout = layer.merged_groups(tuning=[0], clusters=[[1, 2, 3], [4, 5]])
        view = layer.install_view(**layout, quantize_bits=4, quantize_group_size=16)
        assert view.frozen_gate_up_qdata.dtype == torch.uint8
        assert view.frozen_gate_up_qdata.numel() == 2 * 2 * 16 * 32 // 2
        frozen = [g for g, t in enumerate(layout["trainable"]) if not t]
        for g in frozen:  # the dense twin holds exactly the dequantized frozen weights
            layout["gate_up"][g] = flux.ops.quantize(layout["gate_up"][g], 4, 16).dequantize()
            layout["down"][g] = flux.ops.quantize(layout["down"][g], 4, 16).dequantize()
        dlayer.install_view(**layout)
        assert_close(view.group_weights(1).gate_up, dlayer.view.group_weights(1).gate_up, "dequantized group")
    zero_grads(model)
    zero_grads(dense_model)
    a, b = step(dense_model, input_ids()), step(model, input_ids())
    assert_close(a.logits, b.logits, "logits")
    for layer, dlayer in zip(handle.moe_layers, dense.moe_layers):
        assert_close(dlayer.view.tuned_gate_up.grad, layer.view.tuned_gate_up.grad, "tuned grad")


def test_released_originals_need_full_weights_to_return():
    model = tiny_mixtral()
    ref = copy.deepcopy(model)
    handle = flux.patch(model)
    layer = handle.moe_layers[0]
    experts = model.model.layers[0].mlp.experts
    full = {"gate_up": experts.gate_up_proj.detach().clone(), "down": experts.down_proj.detach().clone()}
    original_param = experts.gate_up_proj
    opt = torch.optim.SGD([experts.gate_up_proj, experts.down_proj], lr=0.1)  # holds the original Parameters
    layer.install_merged_view(tuning=[2], clusters=[[0, 1, 3]], keep_originals=False)
    opt.add_param_group({"params": layer.trainable_parameters()})
    assert experts.gate_up_proj.device.type == "meta" and experts.gate_up_proj.shape == (4, 32, 32)
    assert original_param.numel() == 0  # storage freed
    step(model, input_ids())
    opt.step()
    with pytest.raises(RuntimeError, match="released"):
        layer.expert_weights(0)
    with pytest.raises(RuntimeError, match="full_weights"):
        layer.remove_view()
    with pytest.raises(RuntimeError, match="released"):
        handle.restore()
    trained = layer.tuned_weights()[2]
    layer.remove_view(full_weights=full)
    assert experts.gate_up_proj is original_param and original_param.shape == (4, 32, 32)
    assert torch.equal(experts.gate_up_proj[2], trained.gate_up)
    assert torch.equal(experts.gate_up_proj[0], full["gate_up"][0])
    handle.restore()
    with torch.no_grad():
        experts_ref = ref.model.layers[0].mlp.experts
        experts_ref.gate_up_proj[2] = trained.gate_up
        experts_ref.down_proj[2] = trained.down
        assert_close(ref(input_ids(), use_cache=False).logits, model(input_ids(), use_cache=False).logits, "logits")


# ----------------------------------------------------------------------------- bad layouts
@pytest.fixture
def layer():
    return flux.patch(tiny_mixtral()).moe_layers[0]  # E=4, H=32, I=16


def _w(g=2, h=32, i=16):
    return torch.randn(g, 2 * i, h), torch.randn(g, h, i)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(expert_to_group=[0, 1, 1]), LayoutError, r"3 entries but the layer has 4 experts"),
    (dict(expert_to_group=[0, 1, 2, 1]), LayoutIndexError, r"expert_to_group\[2\] = 2 is out of range \[-1, 2\)"),
    (dict(expert_to_group=[0, -2, 1, 1]), IndexError, r"expert_to_group\[1\] = -2 is out of range"),
    (dict(expert_to_group=[0, 0, 0, -1]), LayoutError, r"group\(s\) \[1\] serve no expert"),
    (dict(expert_to_group=[0, 1.5, 1, 1]), LayoutError, r"expert_to_group\[1\] = 1.5 is not an integer"),
    (dict(expert_to_group=torch.tensor([0.0, 1, 1, 1])), LayoutError, r"must hold integers"),
    (dict(trainable=[True]), LayoutError, r"1 flags but there are 2 groups"),
    (dict(gate_up=torch.randn(2, 32, 31)), LayoutError, r"gate_up has shape \(2, 32, 31\), expected \(2, 32, 32\)"),
    (dict(down=torch.randn(3, 32, 16)), LayoutError, r"down has shape \(3, 32, 16\), expected \(2, 32, 16\)"),
    (dict(down=torch.randn(2, 32)), LayoutError, r"3-D stack"),
    (dict(gate_up_bias=torch.zeros(2, 32), down_bias=torch.zeros(2, 32)), LayoutError, r"no biases"),
    (dict(quantize_bits=3), LayoutError, r"quantize_bits must be None, 4 or 8, got 3"),
])
def test_bad_layouts_raise_clear_errors(layer, kwargs, exc, match):
    gu, dn = _w()
    args = dict(expert_to_group=[0, 1, 1, -1], gate_up=gu, down=dn, trainable=[True, False])
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        layer.install_view(**args)
    assert layer.view is None
    layer.install_view(expert_to_group=[0, 1, 1, -1], gate_up=gu, down=dn, trainable=[True, False])  # the good one
    with pytest.raises(RuntimeError, match="already installed"):
        layer.install_view(expert_to_group=[0, 1, 1, -1], gate_up=gu, down=dn, trainable=[True, False])


def test_bad_merge_plans_and_indices(layer):
    with pytest.raises(LayoutError, match=r"expert 1 appears twice"):
        layer.merged_groups(tuning=[0, 1], clusters=[[1, 2, 3]])
    with pytest.raises(LayoutError, match=r"experts \[3\] are neither"):
        layer.merged_groups(tuning=[0], clusters=[[1, 2]])
    with pytest.raises(LayoutIndexError, match=r"expert 4 is out of range \[0, 4\)"):
        layer.merged_groups(tuning=[4], clusters=[[0, 1, 2, 3]])
    with pytest.raises(LayoutError, match=r"weights has 3 entries, expected 4"):
        layer.merged_groups(tuning=[0], clusters=[[1, 2, 3]], weights=[1, 2, 3])
    with pytest.raises(LayoutIndexError, match=r"expert -1 is out of range"):
        layer.expert_weights(-1)
    w = layer.expert_weights(0)
    with pytest.raises(LayoutError, match=r"down has shape \(16, 32\), expected \(32, 16\)"):
        layer.set_expert_weights(0, ExpertWeights(w.gate_up, w.down.t()))
