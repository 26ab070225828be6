"""profile_model: counts, padding, samples, attention scores, quantization error, errors."""
from __future__ import annotations

import pytest
import torch

import flux
from flux.profiling import ModelProfile, profile_model, received_attention
from tests.profiling import MODELS, make_batches, router_counts, routers, tiny_deepseek_v3, tiny_mixtral

torch.set_num_threads(1)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_unquantized_counts_equal_the_models_own_routing(family):
    model = MODELS[family]()
    batches = make_batches()
    profile = profile_model(model, batches, bits=None)
    expected = router_counts(model, batches)
    assert len(profile.layers) == len(expected) >= 1
    for layer, counts in zip(profile.layers, expected):
        assert torch.equal(layer.counts, counts)
        assert layer.counts.sum() > 0
        assert torch.allclose(layer.frequency, counts.double() / counts.sum())


def test_unquantized_counts_equal_patched_handle_counts_and_leave_them_untouched():
    model = tiny_mixtral()
    handle = flux.patch(model)
    batches = make_batches(pad=False)
    for layer in handle.moe_layers:
        layer.reset_counts()
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    handle_counts = [layer.counts.clone() for layer in handle.moe_layers]
    profile = profile_model(model, batches, bits=None)
    for layer, counts, h in zip(profile.layers, handle_counts, handle.moe_layers):
        assert torch.equal(layer.counts, counts)
        assert torch.equal(h.counts, counts)  # profiling did not add to the live handle's counts
    handle.restore()


def test_int8_error_is_below_int4_and_both_small():
    model = tiny_mixtral()
    batches = make_batches(num=4, batch=8, seq=16)
    full = profile_model(model, batches, bits=None)
    err8 = profile_model(model, batches, bits=8).relative_l1(full)
    err4 = profile_model(model, batches, bits=4).relative_l1(full)
    assert 0 < err4 < 0.15
    assert err8 < err4
    assert err8 < 0.05
    assert full.relative_l1(full) == 0.0


@pytest.mark.parametrize("bits", [None, 4])
def test_padding_is_excluded(bits):
    model = tiny_mixtral()
    batches = make_batches()
    def scramble_padding(b):
        return dict(b, input_ids=torch.where(b["attention_mask"].bool(), b["input_ids"], (b["input_ids"] * 7 + 3) % 256))

    garbage = [scramble_padding(b) for b in batches]
    clean, noisy = profile_model(model, batches, bits=bits), profile_model(model, garbage, bits=bits)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert tokens < sum(b["attention_mask"].numel() for b in batches)  # there is padding at all
    for a, b in zip(clean.layers, noisy.layers):
        assert a.num_tokens == tokens
        assert int(a.counts.sum()) == tokens * 2
        assert torch.equal(a.counts, b.counts)
        assert torch.equal(a.sample_tokens, b.sample_tokens)
        assert torch.allclose(a.attention, b.attention, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_sample_tokens_rows_sum_to_tokens_times_top_k(family):
    model = MODELS[family]()
    top_k = model.config.num_experts_per_tok
    batches = make_batches()
    profile = profile_model(model, batches, bits=4, num_samples=20)
    per_sample = torch.cat([b["attention_mask"].sum(1) for b in batches])
    for layer in profile.layers:
        assert layer.sample_tokens.shape == (20, layer.num_experts) and layer.sample_tokens.dtype == torch.int32
        assert torch.equal(layer.sample_tokens.sum(1)[: per_sample.numel()].long(), per_sample * top_k)
        assert torch.equal(layer.sample_tokens.sum(0).long(), layer.counts)
        for e in range(layer.num_experts):
            idx, tok = layer.samples(e)
            assert torch.equal(tok, layer.sample_tokens[idx, e]) and bool((tok > 0).all())
            assert int(tok.sum()) == int(layer.counts[e])
    grown = profile_model(model, batches, bits=4)  # without num_samples: max index + 1 rows
    assert grown.layers[0].sample_tokens.shape[0] == per_sample.numel()


def test_attention_score_matches_a_hand_computation():
    model = tiny_mixtral(layers=1)
    batches = make_batches(num=2, batch=3, seq=7)
    profile = profile_model(model, batches, bits=None)
    router = routers(model)[0]
    num_experts = router.weight.shape[0]
    sums, events = [0.0] * num_experts, [0] * num_experts
    for b in batches:
        captured = {}
        handle = router.register_forward_hook(lambda m, a, out: captured.update(ids=out[-1]))
        with torch.no_grad():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True)
        handle.remove()
        attn, mask = out.attentions[0], b["attention_mask"]
        batch, heads, seq, _ = attn.shape
        ids = captured["ids"].reshape(batch, seq, -1)
        for s in range(batch):
            for j in range(seq):
                if not mask[s, j]:
                    continue
                received = [float(attn[s, h, q, j]) for h in range(heads) for q in range(j, seq) if mask[s, q]]
                a_j = sum(received) / len(received)
                for e in ids[s, j].tolist():
                    sums[e] += a_j
                    events[e] += 1
    expected = torch.tensor([s / n if n else 0.0 for s, n in zip(sums, events)], dtype=torch.float64)
    assert torch.allclose(profile.layers[0].attention, expected, rtol=1e-5, atol=1e-7)
    assert bool((expected > 0).any())


def test_received_attention_on_a_tiny_explicit_case():
    # one head, S = 3, last token padding: a_0 = mean(A[0,0], A[1,0]), a_1 = A[1,1]
    attn = torch.tensor([[[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.2, 0.3, 0.5]]]])
    mask = torch.tensor([[1, 1, 0]])
    got = received_attention(attn, mask)
    assert torch.allclose(got, torch.tensor([[0.625, 0.75, 0.0]], dtype=torch.float64))


def test_nonzero_correction_bias_profiles_the_routers_own_choice():
    model = tiny_deepseek_v3()
    with torch.no_grad():
        for r in routers(model):
            r.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, r.e_score_correction_bias.numel()))
    batches = make_batches()
    with pytest.warns(RuntimeWarning, match="e_score_correction_bias"):
        profile = profile_model(model, batches, bits=None)
    for layer, counts in zip(profile.layers, router_counts(model, batches)):
        assert torch.equal(layer.counts, counts)


def test_attention_off_and_round_trip_through_dict():
    model = tiny_mixtral()
    batches = make_batches()
    profile = profile_model(model, batches, bits=8, attention=False)
    assert profile.bits == 8 and profile.seconds > 0
    assert all(float(layer.attention.abs().sum()) == 0.0 for layer in profile.layers)
    again = ModelProfile.from_dict(profile.to_dict())
    for a, b in zip(profile.layers, again.layers):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.sample_tokens, b.sample_tokens)
        assert torch.equal(a.frequency, b.frequency)


def test_bad_arguments_raise_value_errors():
    model = tiny_mixtral()
    batches = make_batches(num=1)
    with pytest.raises(ValueError, match="bits"):
        profile_model(model, batches, bits=3)
    with pytest.raises(ValueError, match="index"):
        profile_model(model, batches, bits=None, num_samples=2)
    with pytest.raises(ValueError, match="input_ids"):
        profile_model(model, [{"input_ids": batches[0]["input_ids"].float(), "index": batches[0]["index"]}], bits=None)
    one = profile_model(model, batches, bits=None)
    with pytest.raises(ValueError, match="layers"):
        one.relative_l1(ModelProfile(one.layers[:1], None, 0.0))
