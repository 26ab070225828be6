"""A byte-level BPE tokenizer trained locally (no hub), cached on disk.

``get_tokenizer(texts, vocab_size)`` hashes the corpus and the settings; the first call trains a
``tokenizers`` BPE model (a few seconds on the built-in corpora) and stores it as
``<cache>/tokenizers/bpe-<vocab>-<hash>.json``; later calls with the same corpus and settings load
that file.  Byte-level means every string round-trips exactly (no unknown token), which keeps the
models built from transformers configs honest about what they see.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flux.data.cache import atomic_write_text, cache_dir, file_lock

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
# Bump when the training recipe changes, so stale cache entries are not reused.
_RECIPE_VERSION = "bytebpe-v1"


def corpus_hash(texts: Sequence[str], *settings: object) -> str:
    """SHA-256 over the texts (length-prefixed, so ``["ab","c"] != ["a","bc"]``) and ``settings``."""
    h = hashlib.sha256()
    h.update(repr((_RECIPE_VERSION, *settings)).encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def train_bpe(texts: Sequence[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts`` (specials get ids 0, 1, 2)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: no invented leading space, so decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (int64 [N, length]) of token rows;
    ``length`` None = the longest row (every row must fit ``length``)."""
    length = max((len(r) for r in rows), default=0) if length is None else length
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class FluxTokenizer:
    """A trained ``tokenizers.Tokenizer`` with batch encoding to padded torch tensors.

    Attributes: ``tokenizer`` (the ``tokenizers`` object), ``path`` (its cache file, if any) and
    ``cache_hit`` (True when :func:`get_tokenizer` loaded it instead of training).
    """

    def __init__(self, tokenizer: Tokenizer, path: Path | None = None, cache_hit: bool = False) -> None:
        self.tokenizer = tokenizer
        self.path = path
        self.cache_hit = cache_hit
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}")
        self.pad_id, self.bos_id, self.eos_id = ids

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "FluxTokenizer":
        return cls(Tokenizer.from_file(str(path)), Path(path), cache_hit=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer JSON atomically."""
        return atomic_write_text(path, self.tokenizer.to_str())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        path = str(self.path) if self.path else None
        return f"FluxTokenizer(vocab_size={self.vocab_size}, path={path!r}, cache_hit={self.cache_hit})"

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of one text: no special tokens, no truncation."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(
        self,
        texts: str | Sequence[str],
        max_length: int = 128,
        padding: str = "max_length",
        truncation: bool = True,
        add_special_tokens: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Encode a batch to ``{"input_ids", "attention_mask"}``, int64 tensors ``[B, L]``.

        ``add_special_tokens`` wraps each sequence as ``<bos> ... <eos>`` (counted in ``max_length``).
        ``truncation`` keeps the first tokens (and the ``<eos>``); without it an over-long text is an
        error.  ``padding="max_length"`` gives ``L = max_length``; ``"longest"`` pads to the longest
        sequence in the batch.  Padding is on the right with ``<pad>`` (mask 0).
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        n_special = 2 if add_special_tokens else 0
        if max_length <= n_special:
            raise ValueError(f"max_length must exceed the {n_special} special tokens, got {max_length}")
        # encode_batch runs in parallel in Rust; truncation/padding is done here so the shared
        # tokenizer object is never mutated (enable_truncation would be a global side effect).
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        budget = max_length - n_special
        rows: list[list[int]] = []
        for i, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) > budget:
                if not truncation:
                    raise ValueError(f"text {i} has {len(ids) + n_special} tokens > max_length={max_length} (truncation=False)")
                ids = ids[:budget]
            rows.append([self.bos_id, *ids, self.eos_id] if add_special_tokens else list(ids))
        return pad_rows(rows, self.pad_id, max_length if padding == "max_length" else None)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence (padding and, by default, ``<bos>``/``<eos>`` dropped)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, input_ids: torch.Tensor | Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.tolist()
        return self.tokenizer.decode_batch([list(r) for r in input_ids], skip_special_tokens=skip_special_tokens)

    def to_hf(self):
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (imported lazily)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def get_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
) -> FluxTokenizer:
    """A byte-level BPE tokenizer for ``texts``, loaded from the cache or trained and cached.

    The cache key is (corpus hash, vocab size, min frequency, recipe version); ``cache_dir``
    defaults to ``<FLUX_CACHE>/tokenizers``.  Concurrent callers train once: the second waits on
    the lock and then loads the file the first wrote.
    """
    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("get_tokenizer needs a non-empty corpus")
    folder = Path(cache_dir) if cache_dir is not None else _default_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = corpus_hash(corpus, vocab_size, min_frequency)[:20]
    path = folder / f"bpe-{vocab_size}-{key}.json"
    if path.is_file():
        return FluxTokenizer.from_file(path)
    with file_lock(folder / f"bpe-{vocab_size}-{key}.lock"):
        if path.is_file():
            return FluxTokenizer.from_file(path)
        tok = FluxTokenizer(train_bpe(corpus, vocab_size, min_frequency), path, cache_hit=False)
        tok.save(path)
    return tok


def _default_dir() -> Path:
    return cache_dir("tokenizers")
