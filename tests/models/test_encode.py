"""encode_dataset / EncodedDataset / lm_blocks on a tiny dataset."""
from __future__ import annotations

import pytest
import torch

from flux.data.encode import EncodedDataset, encode_dataset, lm_blocks
from flux.data.sources import Dataset, Example
from flux.data.tokenizer import get_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "hello", "what a lovely sunny day it is",
         "the experts route tokens", "merge the frozen experts"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return get_tokenizer(TEXTS * 4, vocab_size=300, cache_dir=tmp_path_factory.mktemp("tok"))


def _dataset(labels):
    return Dataset([Example(t, label=lab) for t, lab in zip(TEXTS, labels)], "tiny")


def test_encode_pads_masks_and_labels(tokenizer):
    data = _dataset(["pos", "neg", "pos", "mid", "neg", "pos"])
    enc = encode_dataset(tokenizer, data, seq_len=8)
    assert enc.label_names == ["mid", "neg", "pos"]
    assert enc.labels.tolist() == [2, 1, 2, 0, 1, 2] and enc.labels.dtype == torch.long
    assert enc.input_ids.shape == enc.attention_mask.shape == (6, 8) and enc.input_ids.dtype == torch.long
    short = len(tokenizer.encode_ids("hello")) + 2  # <bos> hello <eos>
    assert enc.attention_mask[2].tolist() == [1] * short + [0] * (8 - short)
    assert enc.input_ids[2, short:].eq(tokenizer.pad_id).all()
    assert enc.input_ids[:, 0].eq(tokenizer.bos_id).all()
    fixed = encode_dataset(tokenizer, data, seq_len=8, label_names=["pos", "neg", "mid", "extra"])
    assert fixed.labels.tolist() == [0, 1, 0, 2, 1, 0] and fixed.label_names[-1] == "extra"


def test_encode_rejects_bad_labels(tokenizer):
    with pytest.raises(ValueError, match="2 of 6 examples have no label"):
        encode_dataset(tokenizer, _dataset(["a", None, "b", None, "a", "b"]), seq_len=8)
    with pytest.raises(ValueError, match="'zzz'"):
        encode_dataset(tokenizer, _dataset(["a", "zzz", "a", "a", "a", "a"]), seq_len=8, label_names=["a"])


def test_subset_and_batches(tokenizer):
    enc = encode_dataset(tokenizer, _dataset(["a", "b", "c", "a", "b", "c"]), seq_len=8)
    sub = enc.subset([4, 1])
    assert len(sub) == 2 and sub.labels.tolist() == [1, 1] and torch.equal(sub.input_ids[0], enc.input_ids[4])
    plain = list(enc.batches(4, shuffle=False))
    assert [b["index"].tolist() for b in plain] == [[0, 1, 2, 3], [4, 5]]
    first = list(enc.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    again = list(enc.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    order = torch.cat([b["index"] for b in first])
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    assert torch.equal(order, torch.cat([b["index"] for b in again]))
    for b in first:
        assert torch.equal(b["input_ids"], enc.input_ids[b["index"]])
        assert torch.equal(b["labels"], enc.labels[b["index"]])
    with pytest.raises(ValueError, match="batch_size"):
        next(enc.batches(0, shuffle=False))


def test_lm_blocks_is_the_cut_token_stream(tokenizer):
    stream = []
    for text in TEXTS:
        stream += [tokenizer.bos_id, *tokenizer.encode_ids(text), tokenizer.eos_id]
    blocks = lm_blocks(tokenizer, TEXTS, seq_len=5)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 5, 5)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    with pytest.raises(ValueError, match="seq_len=1000"):
        lm_blocks(tokenizer, TEXTS, seq_len=1000)
