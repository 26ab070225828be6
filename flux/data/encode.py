"""Token tensors for training: labelled datasets for classification, token blocks for LM pretraining."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor


@dataclasses.dataclass
class EncodedDataset:
    """A tokenized, labelled dataset.

    Attributes:
        input_ids: int64 ``[N, S]``, right-padded.
        attention_mask: int64 ``[N, S]``, 1 = token, 0 = padding.
        labels: int64 ``[N]``, indices into ``label_names``.
        label_names: class names (index = label id).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    label_names: list[str]

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0]
        if self.input_ids.dim() != 2 or self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [N, S], got "
                             f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}")
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be [N={n}], got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def subset(self, indices: Iterable[int] | Tensor) -> "EncodedDataset":
        """The rows at ``indices`` (a participant's share), same label names."""
        idx = torch.as_tensor(indices if isinstance(indices, Tensor) else list(indices), dtype=torch.long)
        return EncodedDataset(self.input_ids[idx], self.attention_mask[idx], self.labels[idx], list(self.label_names))

    def batches(self, batch_size: int, *, shuffle: bool,
                generator: torch.Generator | None = None) -> Iterator[dict[str, Tensor]]:
        """Mini-batches ``{"input_ids" [B,S], "attention_mask" [B,S], "labels" [B], "index" [B]}``
        (all int64; ``index`` = positions in this dataset).  The last batch may be smaller.
        ``shuffle`` draws one permutation from ``generator`` (the global RNG when None)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            yield {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                   "labels": self.labels[index], "index": index}


def encode_dataset(tokenizer, dataset: Sequence, *, seq_len: int,
                   label_names: list[str] | None = None) -> EncodedDataset:
    """Tokenize a ``flux.data.Dataset`` (``<bos> text <eos>``, truncated and padded to ``seq_len``).

    ``label_names`` fixes the label ids (sorted labels of ``dataset`` when None); every example
    needs a label from it.
    """
    examples = list(dataset)
    unlabelled = sum(e.label is None for e in examples)
    if unlabelled:
        raise ValueError(f"encode_dataset: {unlabelled} of {len(examples)} examples have no label")
    names = sorted({e.label for e in examples}) if label_names is None else list(label_names)
    if len(set(names)) != len(names):
        raise ValueError(f"label_names has duplicates: {names}")
    ids = {name: i for i, name in enumerate(names)}
    unknown = sorted({e.label for e in examples} - ids.keys())
    if unknown:
        raise ValueError(f"encode_dataset: labels {unknown} are not in label_names {names}")
    enc = tokenizer.encode([e.text for e in examples], max_length=seq_len, padding="max_length")
    labels = torch.tensor([ids[e.label] for e in examples], dtype=torch.long)
    return EncodedDataset(enc["input_ids"], enc["attention_mask"], labels, names)


def lm_blocks(tokenizer, texts: Iterable[str], *, seq_len: int) -> Tensor:
    """int64 ``[N, seq_len]``: the texts as one stream ``<bos> t1 <eos> <bos> t2 <eos> ...`` cut into
    consecutive blocks (the incomplete tail is dropped), for causal-LM pretraining."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    corpus = [t for t in texts if t]
    stream: list[int] = []
    # encode_batch tokenizes in parallel in Rust; the FluxTokenizer adds no special tokens itself here
    for enc in tokenizer.tokenizer.encode_batch(corpus, add_special_tokens=False):
        stream.append(tokenizer.bos_id)
        stream.extend(enc.ids)
        stream.append(tokenizer.eos_id)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise ValueError(f"lm_blocks: the texts give {len(stream)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
