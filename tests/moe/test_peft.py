"""PEFT: LoRA on attention while FLUX runs (and tunes) the experts."""
from __future__ import annotations

import copy

import pytest
import torch

import flux
from tests.moe.helpers import compare_models, input_ids, step, tiny_mixtral, tiny_qwen2_moe, zero_grads

peft = pytest.importorskip("peft")


def _lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("order", ["patch_after_peft", "patch_before_peft"])
def test_lora_on_attention_with_flux_experts(order):
    base = tiny_mixtral()
    if order == "patch_after_peft":
        model = _lora(base)
        ref = copy.deepcopy(model)
        handle = flux.patch(model)
    else:
        ref = _lora(copy.deepcopy(base))
        handle = flux.patch(base)
        torch.manual_seed(0)
        model = _lora(base)
        model.load_state_dict(ref.state_dict())
    assert len(handle.moe_layers) == 2
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)  # PEFT froze the base model, experts included
    compare_models(ref, model, input_ids())
    assert all(int(layer.counts.sum()) > 0 for layer in handle.moe_layers)
    handle.restore()


def test_lora_plus_tuning_experts_view():
    model = _lora(tiny_qwen2_moe())
    ref = copy.deepcopy(model)
    handle = flux.patch(model)
    for layer in handle.moe_layers:
        layer.install_merged_view(tuning=[1, 4], clusters=[[0, 2, 3, 5]])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("flux_view.tuned_gate_up" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for s in range(2):
        opt.zero_grad()
        step(model, input_ids(s))
        opt.step()
    lora_changed = any(not torch.equal(p, q) for (n, p), q in zip(model.named_parameters(), ref.parameters())
                       if "lora_" in n)
    assert lora_changed
    tuned = [layer.tuned_weights() for layer in handle.moe_layers]
    handle.restore()  # writes experts 1 and 4 back into the (frozen) base weights
    for layer_tuned, layer in zip(tuned, handle.moe_layers):
        for e, w in layer_tuned.items():
            assert torch.equal(layer.source.expert(e).gate_up, w.gate_up)
    # the adapter checkpoint is unaffected by FLUX
    assert set(peft.get_peft_model_state_dict(model)) == set(peft.get_peft_model_state_dict(ref))
    zero_grads(model)
    with torch.no_grad():
        model(input_ids(), use_cache=False)


def test_lora_on_expert_parameters_runs_through_flux():
    """PEFT's target_parameters LoRA parametrizes the fused expert weights; FLUX reads them."""
    model = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(
        r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False))
    ref = copy.deepcopy(model)
    handle = flux.patch(model)
    assert len(handle.moe_layers) == 2 and all(layer.peft_wrapped for layer in handle.moe_layers)
    compare_models(ref, model, input_ids())
    with pytest.warns(RuntimeWarning, match="LoRA deltas are not applied"):
        handle.moe_layers[0].install_merged_view(tuning=[0], clusters=[[1, 2, 3]])
