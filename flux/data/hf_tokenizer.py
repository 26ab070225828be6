"""A checkpoint's own transformers tokenizer behind the interface of :class:`flux.data.FluxTokenizer`.

The encoders of ``flux.data`` (``encode_dataset``, ``encode_instructions``, ``encode_pairs``)
use ``tokenizer.encode(texts, max_length=...)``, ``tokenizer.tokenizer.encode_batch(texts,
add_special_tokens=False)`` (objects with ``.ids``) and ``pad_id`` / ``bos_id`` / ``eos_id``.
:class:`HFTokenizer` gives exactly that for any ``AutoTokenizer``; unlike ours, a user's tokenizer
may have no ``<bos>`` (``bos_id`` None: rows then start with the text) or no pad token (the
``<eos>`` pads; padding is masked out anyway).
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from flux.data.tokenizer import pad_rows

# files save_pretrained writes for a tokenizer (any one of them means the checkpoint brought one)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


class _BatchEncoder:
    """``encode_batch(texts, add_special_tokens=False)`` -> objects with ``.ids`` (the part of the
    ``tokenizers.Tokenizer`` API the encoders use)."""

    def __init__(self, hf) -> None:
        self._hf = hf

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list:
        if not texts:
            return []
        ids = self._hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [SimpleNamespace(ids=list(row)) for row in ids]

    def encode(self, text: str, add_special_tokens: bool = False):
        return self.encode_batch([text], add_special_tokens)[0]


class HFTokenizer:
    """A transformers tokenizer with :class:`flux.data.FluxTokenizer`'s interface.

    Attributes: ``hf`` (the transformers tokenizer), ``tokenizer`` (batch encoder), ``pad_id``,
    ``bos_id`` (None when the tokenizer has no beginning-of-sequence token), ``eos_id``.
    """

    def __init__(self, hf) -> None:
        self.hf = hf
        self.tokenizer = _BatchEncoder(hf)
        self.bos_id: Optional[int] = hf.bos_token_id
        self.eos_id: Optional[int] = hf.eos_token_id
        pad = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id
        if pad is None:
            raise ValueError("the checkpoint's tokenizer has neither a pad nor an eos token; add one "
                             "(tokenizer.pad_token = ...) and save it again")
        self.pad_id: int = pad
        self.path = getattr(hf, "name_or_path", None)
        self.cache_hit = True

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, trust_remote_code: bool = False) -> "HFTokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, path={self.path!r})"

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def chat_text(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The tokenizer's chat template applied to ``messages`` (text, not ids)."""
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode(self, texts: str | Sequence[str], max_length: int = 128, padding: str = "max_length",
               truncation: bool = True, add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}`` int64 ``[B, L]``: ``[<bos>] text [<eos>]`` (the
        tokens the tokenizer has), truncated keeping the first tokens, right-padded with ``pad_id``
        (as :meth:`flux.data.FluxTokenizer.encode`)."""
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        head = [self.bos_id] if add_special_tokens and self.bos_id is not None else []
        tail = [self.eos_id] if add_special_tokens and self.eos_id is not None else []
        budget = max_length - len(head) - len(tail)
        if budget < 1:
            raise ValueError(f"max_length must exceed the {len(head) + len(tail)} special tokens, got {max_length}")
        rows = []
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            ids = enc.ids
            if len(ids) > budget:
                if not truncation:
                    raise ValueError(f"text {i} has {len(ids) + len(head) + len(tail)} tokens > max_length={max_length}")
                ids = ids[:budget]
            rows.append(head + list(ids) + tail)
        return pad_rows(rows, self.pad_id, max_length if padding == "max_length" else None)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(out_dir))
