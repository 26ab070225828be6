"""flux.patch on transformers 5.x MoE families: same outputs/gradients, counts, restore, save."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import flux
from tests.moe.helpers import (
    FAMILIES,
    MORE_FAMILIES,
    assert_close,
    compare_models,
    histogram,
    input_ids,
    router_choices,
    step,
    tiny_deepseek_v3,
    tiny_mixtral,
    tiny_qwen2_moe,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("family", [*FAMILIES, *MORE_FAMILIES])
def test_patched_matches_unpatched(family):
    model = {**FAMILIES, **MORE_FAMILIES}[family]()
    ref = copy.deepcopy(model)
    handle = flux.patch(model)
    assert handle.moe_layers, family
    assert all(layer.native for layer in handle.moe_layers), [layer.fallback_reason for layer in handle.moe_layers]
    assert all(layer.kind == "experts_interface" for layer in handle.moe_layers)
    compare_models(ref, model, input_ids())


def test_layers_in_depth_order_and_dense_layer_skipped():
    model = tiny_deepseek_v3()
    handle = flux.patch(model)
    assert [layer.name for layer in handle.moe_layers] == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    assert [layer.layer_idx for layer in handle.moe_layers] == [1, 2]
    for layer in handle.moe_layers:
        assert (layer.num_experts, layer.top_k, layer.hidden_size, layer.intermediate_size) == (8, 2, 32, 16)
        assert type(layer.router).__name__ == "DeepseekV3TopkRouter"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_counts_equal_router_histogram(family):
    model = FAMILIES[family]()
    handle = flux.patch(model)
    routers = [layer.name.rsplit(".", 1)[0] + ".gate" for layer in handle.moe_layers]
    with router_choices(model) as seen:
        with torch.no_grad():
            model(input_ids(1), use_cache=False)
            model(input_ids(2, batch=3, seq=5), use_cache=False)
    for layer, router in zip(handle.moe_layers, routers):
        assert layer.counts.dtype == torch.int64 and layer.counts.shape == (layer.num_experts,)
        expected = histogram(seen[router], layer.num_experts)
        assert torch.equal(layer.counts, expected), (router, layer.counts, expected)
        assert int(layer.counts.sum()) == (2 * 9 + 3 * 5) * layer.top_k
    handle.reset_counts()
    assert all(int(c.sum()) == 0 for c in handle.counts())


def test_counts_not_doubled_by_gradient_checkpointing():
    model = tiny_mixtral()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    handle = flux.patch(model)
    with router_choices(model) as seen:
        step(model, input_ids())
    for layer in handle.moe_layers:
        ids = seen[layer.name.replace("experts", "gate")]
        assert len(ids) == 2  # forward + recomputation in backward
        assert torch.equal(layer.counts, histogram(ids[:1], layer.num_experts))


def test_optimizer_built_before_patch_keeps_working():
    model = tiny_mixtral()
    ref = copy.deepcopy(model)
    # SGD: updates linear in the gradients (Adam's g / sqrt(v) would amplify rounding noise of
    # near-zero gradients into full-size steps)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params_before = {n: p for n, p in model.named_parameters()}
    flux.patch(model)
    assert {n: p for n, p in model.named_parameters()} == params_before  # same Parameter objects
    for s in range(3):
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            step(m, input_ids(s))
            o.step()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert_close(p, q, f"{name} after 3 SGD steps")


def test_router_logits_and_aux_loss_recorded():
    model = tiny_mixtral(output_router_logits=True, router_aux_loss_coef=0.1)
    ref = copy.deepcopy(model)
    flux.patch(model)
    ids = input_ids()
    a = ref(ids, labels=ids, output_router_logits=True, use_cache=False)
    b = model(ids, labels=ids, output_router_logits=True, use_cache=False)
    assert len(a.router_logits) == len(b.router_logits) == 2
    for x, y in zip(a.router_logits, b.router_logits):
        assert_close(x, y, "router logits")
    assert_close(a.aux_loss, b.aux_loss, "aux loss")
    assert_close(a.loss, b.loss, "loss")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_restore_round_trip(family):
    model = FAMILIES[family]()
    ref = copy.deepcopy(model)
    before_impl = model.config._experts_implementation
    keys = list(model.state_dict())
    buffers = [n for n, _ in model.named_buffers()]
    handle = flux.patch(model)
    assert model.config._experts_implementation == "flux"
    step(model, input_ids())
    handle.restore()
    assert handle.restored
    assert model.config._experts_implementation == before_impl
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_buffers()] == buffers
    assert not any(hasattr(m, "_flux_layer") for m in model.modules())
    compare_models(ref, model, input_ids(3))
    handle2 = flux.patch(model)  # patchable again
    flux.unpatch(model)
    assert handle2.restored and model.config._experts_implementation == before_impl


def test_double_patch_and_no_moe_raise():
    model = tiny_mixtral()
    flux.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        flux.patch(model)
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="no MoE layer"):
        flux.patch(dense)
    with pytest.raises(ValueError, match="not patched"):
        flux.unpatch(dense)


def _saved(model, path):
    model.save_pretrained(path)
    files = sorted(os.listdir(path))
    tensors = {}
    for f in files:
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, f)))
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    return files, tensors, config


@pytest.mark.parametrize("builder", [tiny_mixtral, tiny_qwen2_moe, tiny_deepseek_v3], ids=["mixtral", "qwen2_moe", "deepseek_v3"])
def test_save_pretrained_same_format_and_loads(builder, tmp_path):
    model = builder()
    ref = copy.deepcopy(model)
    files_a, tensors_a, config_a = _saved(ref, tmp_path / "unpatched")
    handle = flux.patch(model)
    step(model, input_ids())  # patched use does not change the checkpoint
    files_b, tensors_b, config_b = _saved(model, tmp_path / "patched")
    assert files_a == files_b
    assert config_a == config_b and "flux" not in json.dumps(config_b)
    assert tensors_a.keys() == tensors_b.keys()
    for k in tensors_a:
        assert torch.equal(tensors_a[k], tensors_b[k]), k
    loaded = type(model).from_pretrained(tmp_path / "patched").float().train()
    assert loaded.config._experts_implementation != "flux"
    compare_models(ref, loaded, input_ids(4), grads=False)
    flux.patch(loaded)
    compare_models(ref, loaded, input_ids(5))
    handle.restore()


def test_bf16_runs_close_to_unpatched():
    model = tiny_mixtral().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    flux.patch(model)
    ids = input_ids()
    with torch.no_grad():
        a = ref(ids, use_cache=False).logits.float()
        b = model(ids, use_cache=False).logits.float()
        exact = tiny_mixtral()(ids, use_cache=False).logits
    # bf16: no worse than 2x the error of transformers' own bf16 run against fp32
    assert (b - exact).abs().max() <= 2 * (a - exact).abs().max() + 1e-2
