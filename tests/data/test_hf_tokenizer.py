"""flux.data.hf_tokenizer (a checkpoint's own tokenizer behind FluxTokenizer's interface) and
flux.data.instructions.encode_pairs (a user's prompt -> response rows, with or without a chat
template)."""
from __future__ import annotations

import pytest
import torch

from flux.data.hf_tokenizer import HFTokenizer, has_tokenizer
from flux.data.instructions import encode_pairs
from flux.data.tables import Pair
from tests.models.byo_helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return HFTokenizer(tiny_tokenizer())


def tokens(tok, row, mask=None):
    ids = row if mask is None else row[mask.bool()]
    return tok.hf.convert_ids_to_tokens(ids.tolist())


def test_interface_of_the_flux_tokenizer(tok, tmp_path):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3) and tok.has_chat_template
    enc = tok.encode(["the film was good", "the cat"], max_length=5)
    assert enc["input_ids"].dtype == torch.long and enc["input_ids"].shape == (2, 5)
    assert tokens(tok, enc["input_ids"][0]) == ["<bos>", "the", "film", "was", "<eos>"]  # truncated, eos kept
    assert tokens(tok, enc["input_ids"][1], enc["attention_mask"][1]) == ["<bos>", "the", "cat", "<eos>"]
    assert enc["input_ids"][1, 4] == tok.pad_id and enc["attention_mask"][1].tolist() == [1, 1, 1, 1, 0]
    assert [e.ids for e in tok.tokenizer.encode_batch(["the cat"], add_special_tokens=False)] == [tok.encode_ids("the cat")]
    assert tok.decode(tok.encode_ids("the cat")) == "the cat"
    longest = tok.encode(["the", "the cat sat"], max_length=32, padding="longest")
    assert longest["input_ids"].shape == (2, 5)
    tok.save_pretrained(tmp_path)
    assert has_tokenizer(tmp_path) and not has_tokenizer(tmp_path / "nothing")


def test_no_bos_and_no_pad(tmp_path):
    hf = tiny_tokenizer()
    hf.bos_token = None
    hf.pad_token = None
    t = HFTokenizer(hf)
    assert t.bos_id is None and t.pad_id == t.eos_id == 3
    enc = t.encode(["the cat"], max_length=4)
    assert tokens(t, enc["input_ids"][0], enc["attention_mask"][0]) == ["the", "cat", "<eos>"]
    rows = encode_pairs(t, [Pair("what says the cat", "meow")], seq_len=12)
    assert tokens(t, rows.input_ids[0], rows.attention_mask[0])[:2] == ["what", "says"]
    hf.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        HFTokenizer(hf)


def test_pairs_with_the_chat_template(tok):
    rows = encode_pairs(tok, [Pair("what colour is the sky", "blue", "colour")], seq_len=16, chat_template=True)
    ids, mask, loss = rows.input_ids[0], rows.attention_mask[0], rows.loss_mask[0]
    assert tokens(tok, ids, mask) == ["<|user|>", "what", "colour", "is", "the", "sky", "<|end|>", "<|assistant|>",
                                      "blue", "<|end|>", "<eos>"]
    assert tokens(tok, ids, loss) == ["blue", "<|end|>", "<eos>"]  # response + the template's closing + eos
    assert rows.tasks == ["colour"]


def test_pairs_without_a_template(tok):
    rows = encode_pairs(tok, [Pair("what says the dog", "woof"), Pair("the cat says ", "meow")], seq_len=10)
    assert tokens(tok, rows.input_ids[0], rows.attention_mask[0]) == ["<bos>", "what", "says", "the", "dog", "woof",
                                                                      "<eos>"]
    assert tokens(tok, rows.input_ids[0], rows.loss_mask[0]) == ["woof", "<eos>"]
    assert rows.tasks == ["all", "all"]


def test_long_rows_cut_the_prompt_from_the_left_then_the_response(tok):
    long_prompt = " ".join(["the cat"] * 20)
    rows = encode_pairs(tok, [Pair(long_prompt, "meow woof")], seq_len=8)
    assert tokens(tok, rows.input_ids[0]) == ["<bos>", "the", "cat", "the", "cat", "meow", "woof", "<eos>"]
    with pytest.warns(RuntimeWarning, match="1 of 1 responses were cut"):
        rows = encode_pairs(tok, [Pair("what says the cat", " ".join(["meow"] * 20))], seq_len=10, min_prompt_tokens=3)
    got = tokens(tok, rows.input_ids[0])
    assert got[:4] == ["<bos>", "says", "the", "cat"] and got[4:] == ["meow"] * 6  # 3 prompt tokens kept
    assert int(rows.loss_mask[0].sum()) == 6
