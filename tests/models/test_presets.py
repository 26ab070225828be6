"""Presets build, patch, train one step and return attentions; init is seeded."""
from __future__ import annotations

import pytest
import torch

import flux
from flux.models import PRESETS, build_config, build_lm

VOCAB = 256 + 3


def _moe_layer_count(config) -> int:
    return config.num_hidden_layers - getattr(config, "first_k_dense_replace", 0)


def _experts_and_top_k(config) -> tuple[int, int]:
    experts = getattr(config, "num_local_experts", None) or config.n_routed_experts
    return experts, config.num_experts_per_tok


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_patches_and_trains(name):
    config = build_config(name, VOCAB, max_positions=64)
    assert config.vocab_size == VOCAB and config.max_position_embeddings == 64
    assert config._attn_implementation == "eager"
    lm = build_lm(config, seed=0)
    handle = flux.patch(lm)
    try:
        experts, top_k = _experts_and_top_k(config)
        assert len(handle.moe_layers) == _moe_layer_count(config)
        assert all(layer.num_experts == experts and layer.top_k == top_k for layer in handle.moe_layers)
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
        out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
        assert len(out.attentions) == config.num_hidden_layers
        assert out.attentions[0].shape == (2, config.num_attention_heads, 12, 12)
        # every routed slot of every token is counted once per MoE layer
        assert all(int(layer.counts.sum()) == 2 * 12 * top_k for layer in handle.moe_layers)
        lm(input_ids=ids, labels=ids).loss.backward()
        for layer in handle.moe_layers:
            grads = [p.grad for p in layer.source.expert_parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        handle.restore()


def test_same_seed_same_weights_and_global_rng_untouched():
    config = build_config("deepseek-tiny", VOCAB)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_lm(config, seed=7).state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # build_lm forked the RNG
    b = build_lm(config, seed=7).state_dict()
    c = build_lm(config, seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    experts = [k for k in a if k.endswith("experts.gate_up_proj")]
    assert experts and not torch.equal(a[experts[0]], c[experts[0]])


def test_config_specs():
    over = build_config({"preset": "mixtral-tiny", "num_hidden_layers": 2, "num_local_experts": 4}, VOCAB)
    assert over.num_hidden_layers == 2 and over.num_local_experts == 4 and over.hidden_size == 128
    raw = build_config({"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 4}, VOCAB)
    assert type(raw).__name__ == "MixtralConfig" and raw.hidden_size == 32 and raw._attn_implementation == "eager"
    assert PRESETS["mixtral-tiny"]["hidden_size"] == 128  # overrides never leak into the table
    with pytest.raises(ValueError, match="mixtral-tiny"):
        build_config("gpt-huge", VOCAB)
    with pytest.raises(ValueError, match="model_type"):
        build_config({"hidden_size": 8}, VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        build_config("mixtral-tiny", 0)
