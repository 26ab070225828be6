"""MoEClassifier: shapes, masked pooling, gradients to head and experts, evaluate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flux
from flux.data.encode import EncodedDataset
from flux.models import MoEClassifier, build_config, build_lm, evaluate

VOCAB = 300
TINY = {"preset": "mixtral-tiny", "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2}


@pytest.fixture()
def model():
    return MoEClassifier(build_lm(build_config(TINY, VOCAB), seed=0), num_labels=3, seed=0)


def _batch(n=4, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    lengths = torch.tensor([seq, seq - 3, 4, 1])[:n]
    for i, length in enumerate(lengths.tolist()):
        mask[i, length:] = 0
        ids[i, length:] = 0
    return ids, mask


def test_logits_shape_and_padding_is_ignored(model):
    ids, mask = _batch()
    logits = model(ids, mask)
    assert logits.shape == (4, 3) and logits.dtype == torch.float32
    other_pad = ids.masked_fill(mask == 0, 7)  # different tokens where the mask is 0
    torch.testing.assert_close(model(other_pad, mask), logits)
    assert not torch.allclose(model(ids, torch.ones_like(mask)), logits)  # the mask is used


def test_gradients_reach_head_and_experts(model):
    handle = flux.patch(model.lm)
    try:
        ids, mask = _batch()
        F.cross_entropy(model(ids, mask), torch.tensor([0, 1, 2, 0])).backward()
        assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
        for layer in handle.moe_layers:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.source.expert_parameters())
        assert model.lm.lm_head.weight.grad is None  # classification does not use the LM head
    finally:
        handle.restore()


def test_backbone_and_seeded_head(model):
    assert model.backbone is model.lm.model
    out = model.backbone(input_ids=_batch()[0], attention_mask=_batch()[1], output_attentions=True)
    assert out.attentions[0].shape == (4, 4, 10, 10)
    lm = model.lm
    same = MoEClassifier(lm, num_labels=3, seed=0)
    other = MoEClassifier(lm, num_labels=3, seed=1)
    assert torch.equal(same.head.weight, model.head.weight)
    assert not torch.equal(other.head.weight, model.head.weight)
    with pytest.raises(ValueError, match="num_labels"):
        MoEClassifier(lm, num_labels=1)


def test_evaluate_matches_a_manual_pass(model):
    ids, mask = _batch()
    labels = torch.tensor([0, 1, 2, 1])
    data = EncodedDataset(ids, mask, labels, ["a", "b", "c"])
    model.train()
    result = evaluate(model, data, batch_size=3)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        logits = model(ids, mask)
    assert result["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
