"""quantize_model: no full-precision copy, one module dense at a time, independent of its source."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import flux
from flux.ops import QuantizedTensor
from flux.profiling import profile_model, quantize_model
from tests.profiling import MODELS, make_batches, tiny_mixtral

torch.set_num_threads(1)


def _fp32_bytes(model: nn.Module) -> int:
    return sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("family", sorted(MODELS))
def test_holds_packed_weights_only(family):
    model = MODELS[family]()
    q4, q8 = quantize_model(model, 4), quantize_model(model, 8)
    names = list(q4.packed)
    assert any("experts.gate_up_proj" in n for n in names) and any("experts.down_proj" in n for n in names)
    assert any("self_attn" in n for n in names) and any(n.endswith("mlp.gate.weight") for n in names)
    assert all(isinstance(p, QuantizedTensor) and p.bits == 4 for p in q4.packed.values())
    full = _fp32_bytes(model)
    assert q4.nbytes < 0.3 * full, (q4.nbytes, full)
    assert q4.nbytes < q8.nbytes < 0.45 * full
    embeddings = {id(m.weight) for m in q4.module.modules() if isinstance(m, nn.Embedding)}
    for name, p in q4.module.named_parameters():
        if name in q4.packed:
            assert p.is_meta, name
        else:  # what stays dense: vectors and the embedding table
            assert p.dim() == 1 or id(p) in embeddings, name


@pytest.mark.parametrize("patched", [False, True])
def test_at_most_one_module_is_dequantized_at_a_time(patched):
    model = tiny_mixtral()
    if patched:
        flux.patch(model)
    q = quantize_model(model, 4)
    owners = {name.rsplit(".", 1)[0] for name in q.packed}
    modules = dict(q.module.named_modules())
    seen = []

    def dense_owners(*_):
        seen.append(sum(any(not p.is_meta for p in modules[o]._parameters.values() if p is not None and p.dim() >= 2)
                        for o in owners))

    hooks = [m.register_forward_pre_hook(dense_owners) for m in q.module.modules()]
    hooks += [m.register_forward_hook(dense_owners) for m in q.module.modules()]
    b = make_batches(num=1)[0]
    q(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    assert max(seen) == 1 and q.peak_dequantized == 1
    assert all(q.module.get_parameter(n).is_meta for n in q.packed)  # all released after the call


def test_independent_of_the_source_model():
    model = tiny_mixtral()
    batches = make_batches()
    q = quantize_model(model, 4)
    before = profile_model(q, batches)
    source = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    mine = [p.qdata for p in q.packed.values()] + [p.scales for p in q.packed.values()]
    mine += [t for t in list(q.module.parameters()) + list(q.module.buffers()) if not t.is_meta]
    assert not source & {t.untyped_storage().data_ptr() for t in mine}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(0.5)
    after = profile_model(q, batches)
    moved = profile_model(model, batches, bits=4)
    for a, b, c in zip(before.layers, after.layers, moved.layers):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.sample_tokens, b.sample_tokens)
        assert torch.equal(a.attention, b.attention)
        assert not torch.equal(a.attention, c.attention)  # the source did change


def test_exact_snapshot_profiles_like_the_model_itself():
    model = tiny_mixtral()
    batches = make_batches()
    direct = profile_model(model, batches, bits=None)
    snap = profile_model(quantize_model(model, None), batches)
    assert snap.bits is None
    for a, b in zip(direct.layers, snap.layers):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.sample_tokens, b.sample_tokens)
        assert torch.allclose(a.attention, b.attention, rtol=0, atol=1e-12)


def test_refuses_bad_arguments_and_merged_views():
    model = tiny_mixtral()
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, 2)
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(model, 4, group_size=0)
    handle = flux.patch(model)
    handle.moe_layers[0].install_merged_view(tuning=[0], clusters=[[1, 2, 3, 4, 5, 6, 7]])
    with pytest.raises(ValueError, match="merged view"):
        quantize_model(model, 4)
