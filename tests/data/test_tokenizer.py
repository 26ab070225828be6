"""The locally trained byte-level BPE tokenizer: exact round trip, tensor encoding, disk cache."""
from __future__ import annotations

import time

import pytest
import torch

from flux.data.sources import load_chatterbot, load_pydoc
from flux.data.tokenizer import FluxTokenizer, corpus_hash, get_tokenizer

VOCAB = 1024


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return load_pydoc().texts


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def tok(corpus, tok_dir) -> FluxTokenizer:
    return get_tokenizer(corpus, vocab_size=VOCAB, cache_dir=tok_dir)


def test_trained_and_cached(tok, tok_dir):
    assert not tok.cache_hit and tok.path is not None and tok.path.parent == tok_dir and tok.path.is_file()
    assert tok.vocab_size == VOCAB
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_cache_hit_loads_the_same_tokenizer(tok, corpus, tok_dir):
    t0 = time.perf_counter()
    again = get_tokenizer(corpus, vocab_size=VOCAB, cache_dir=tok_dir)
    assert again.cache_hit and again.path == tok.path
    assert time.perf_counter() - t0 < 2.0
    sample = corpus[:20]
    assert torch.equal(again.encode(sample)["input_ids"], tok.encode(sample)["input_ids"])


def test_cache_key_depends_on_corpus_and_vocab(tok, corpus, tok_dir):
    other = get_tokenizer(corpus, vocab_size=VOCAB + 256, cache_dir=tok_dir)
    assert not other.cache_hit and other.path != tok.path and other.vocab_size == VOCAB + 256
    assert corpus_hash(["ab", "c"], 1) != corpus_hash(["a", "bc"], 1)
    assert corpus_hash(corpus, VOCAB) != corpus_hash(corpus[:-1], VOCAB)


def test_round_trip_is_exact_on_real_and_unseen_text(tok, corpus):
    texts = corpus[:50] + load_chatterbot().texts[:200] + [
        "  leading spaces, tabs\tand\nnewlines  ", "Zürich — naïve café 東京 🙂", "x" * 3000, ""]
    for text in texts:
        assert tok.decode(tok.encode_ids(text)) == text


def test_compresses_english(tok, corpus):
    text = "\n\n".join(corpus[:100])
    assert len(tok.encode_ids(text)) < len(text.encode()) / 2.5  # BPE merges learnt, not bytes


def test_encode_pads_truncates_and_masks(tok):
    batch = ["short", "a much longer sentence " * 50]
    out = tok.encode(batch, max_length=32)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == mask.dtype == torch.long
    n0 = len(tok.encode_ids("short")) + 2
    assert ids[0, 0] == tok.bos_id and ids[0, n0 - 1] == tok.eos_id
    assert mask[0].tolist() == [1] * n0 + [0] * (32 - n0)
    assert (ids[0, n0:] == tok.pad_id).all()
    assert mask[1].all() and ids[1, -1] == tok.eos_id  # truncated, <eos> kept
    assert tok.decode_batch(ids)[0] == "short"
    longest = tok.encode(["short", "tiny"], max_length=32, padding="longest")["input_ids"]
    assert longest.shape[1] == n0
    with pytest.raises(ValueError, match="truncation=False"):
        tok.encode(batch, max_length=32, truncation=False)
    plain = tok.encode("short", max_length=8, add_special_tokens=False)["input_ids"]
    assert plain.shape == (1, 8) and tok.decode(plain[0]) == "short"


def test_hf_wrapper(tok):
    hf = tok.to_hf()
    assert hf.pad_token_id == tok.pad_id and hf.decode(hf("héllo wörld")["input_ids"]) == "héllo wörld"


def test_rejects_empty_corpus_and_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        get_tokenizer(["", ""], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        get_tokenizer(["abc"], vocab_size=100, cache_dir=tmp_path)
