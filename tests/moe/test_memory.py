"""Memory accounting: the estimate for a layout equals the bytes of the real tensors after the
layout is installed and an optimizer step is taken."""
from __future__ import annotations

import pytest
import torch

import flux
from flux.moe import LayerLayout, estimate_memory, measure_memory
from tests.moe.helpers import input_ids, step, tiny_deepseek_v3, tiny_mixtral


def _freeze_non_experts(model, handle):
    experts = {id(p) for layer in handle.moe_layers for p in layer.source.expert_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in experts)


def _train_step(model, handle, optimizer):
    optimizer.zero_grad(set_to_none=True)
    step(model, input_ids())
    optimizer.step()


def test_full_layout_adamw_matches_real_tensors():
    model = tiny_mixtral()
    handle = flux.patch(model)
    _freeze_non_experts(model, handle)
    predicted = estimate_memory(handle, None, optimizer="adamw", trainable="none")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _train_step(model, handle, opt)
    real = measure_memory(model, opt)
    assert (predicted.weights, predicted.grads, predicted.optimizer) == (real.weights, real.grads, real.optimizer)
    experts = 2 * 4 * (2 * 16 * 32 + 32 * 16) * 4
    assert predicted.grads == experts
    assert predicted.optimizer == 2 * experts + 2 * 2 * 4  # exp_avg, exp_avg_sq, 4-byte step per param


@pytest.mark.parametrize("bits,keep", [(4, False), (8, True), (None, False)])
def test_merged_layout_matches_real_tensors(bits, keep):
    model = tiny_deepseek_v3()  # 2 MoE layers x 8 experts, H=32, I=16
    handle = flux.patch(model)
    layouts = {0: LayerLayout(tuned=[1, 5], merged_groups=2, quantize_bits=bits, quantize_group_size=16, keep_originals=keep),
               1: LayerLayout(tuned=3, merged_groups=3, quantize_bits=bits, quantize_group_size=16, keep_originals=keep)}
    predicted = estimate_memory(handle, layouts, optimizer="adamw")
    full = estimate_memory(handle, None, optimizer="adamw")
    for p in model.parameters():
        p.requires_grad_(False)
    plans = {0: dict(tuning=[1, 5], clusters=[[0, 2, 3], [4, 6]], drop=[7]),
             1: dict(tuning=[0, 1, 2], clusters=[[3], [4, 5], [6, 7]])}
    for i, layer in enumerate(handle.moe_layers):
        layer.install_merged_view(**plans[i], quantize_bits=bits, quantize_group_size=16, keep_originals=keep)
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
    _train_step(model, handle, opt)
    real = measure_memory(model, opt)
    assert (predicted.weights, predicted.grads, predicted.optimizer) == (real.weights, real.grads, real.optimizer), (
        predicted.details, real)
    per_expert = (2 * 16 * 32 + 32 * 16) * 4
    assert predicted.grads == 5 * per_expert
    if not keep:
        assert predicted.weights < full.weights


def test_bf16_sgd_momentum_all_trainable_matches_real_tensors():
    model = tiny_mixtral()
    handle = flux.patch(model)
    layout = LayerLayout(tuned=1, merged_groups=2)
    predicted = estimate_memory(handle, layout, dtype=torch.bfloat16, optimizer="sgd_momentum", trainable="all")
    model.to(torch.bfloat16)
    for layer in handle.moe_layers:
        layer.install_merged_view(tuning=[2], clusters=[[0, 1], [3]])
    params = [p for p in model.parameters() if p.device.type != "meta"]
    experts = {id(p) for layer in handle.moe_layers for p in layer.source.expert_parameters()}
    for p in params:  # the original experts do not take part under a view
        p.requires_grad_(id(p) not in experts)
    opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=1e-3, momentum=0.9)
    _train_step(model, handle, opt)
    real = measure_memory(model, opt)
    assert (predicted.weights, predicted.grads, predicted.optimizer) == (real.weights, real.grads, real.optimizer)
    assert predicted.details["view_trainable"] == 2 * (2 * 16 * 32 + 32 * 16) * 2


def test_biased_experts_and_bad_layouts():
    from tests.moe.test_variants import VARIANTS, _block

    kw = dict(VARIANTS["biased"])
    model = _block(**kw)
    handle = flux.patch(model)
    for p in model.parameters():
        p.requires_grad_(False)
    predicted = estimate_memory(handle, LayerLayout(tuned=2, merged_groups=1, quantize_bits=8, quantize_group_size=8),
                                optimizer="adam")
    handle.moe_layers[0].install_merged_view(tuning=[0, 4], clusters=[[1, 2, 3]], quantize_bits=8, quantize_group_size=8)
    opt = torch.optim.Adam(handle.trainable_parameters())
    opt.zero_grad()
    model(torch.randn(7, 24)).sum().backward()
    opt.step()
    real = measure_memory(model, opt)
    assert (predicted.weights, predicted.grads, predicted.optimizer) == (real.weights, real.grads, real.optimizer)
    with pytest.raises(ValueError, match="do not fit 5 experts"):
        estimate_memory(handle, LayerLayout(tuned=4, merged_groups=2))
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(handle, None, optimizer="lion")
    with pytest.raises(ValueError, match="2 entries but the model has 1"):
        estimate_memory(handle, [None, None])


@pytest.mark.parametrize("merged", [False, True])
def test_modulelist_model_matches_real_tensors(merged):
    from tests.moe.deepseek_v1 import tiny_deepseek_v1

    model = tiny_deepseek_v1()  # 2 MoE layers x 6 experts, one nn.Linear per projection
    handle = flux.patch(model)
    layout = LayerLayout(tuned=2, merged_groups=2, quantize_bits=4, quantize_group_size=16) if merged else None
    _freeze_non_experts(model, handle)
    if merged:
        for p in model.parameters():
            p.requires_grad_(False)
    predicted = estimate_memory(handle, layout, optimizer="adamw")
    if merged:
        for layer in handle.moe_layers:
            layer.install_merged_view(tuning=[0, 3], clusters=[[1, 2], [4, 5]], quantize_bits=4, quantize_group_size=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _train_step(model, handle, opt)
    real = measure_memory(model, opt)
    assert (predicted.weights, predicted.grads, predicted.optimizer) == (real.weights, real.grads, real.optimizer)
