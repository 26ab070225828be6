"""The task a run works on: data split among participants, a held-out test set, and the
warm-started MoE classifier.  Built identically (same seed, same cache) on every rank."""
from __future__ import annotations

import dataclasses
import random
from typing import Optional

import torch
from torch import nn

from flux.federation.config import RunConfig

# The corpus the tokenizer and the warm start see: local text only (no hub, no task data, so the
# MultiEmo canary's request is respected: its reviews are only fine-tuned on, never pretrained on).
PRETRAIN_SOURCES = ("pydoc", "chatterbot")


@dataclasses.dataclass
class Workload:
    """Everything a rank needs to run participants.

    Attributes:
        model: the global model (a ``flux.models.MoEClassifier``), patched (``handle``).
        handle: ``flux.patch`` handle of ``model.lm``.
        train: per participant, its ``flux.data.encode.EncodedDataset``.
        test: the held-out ``EncodedDataset`` (global evaluation).
        label_names: class names.
        pretrain_info: what the warm start cache reported.
    """

    model: nn.Module
    handle: object
    train: list
    test: object
    label_names: list[str]
    pretrain_info: dict

    @property
    def model_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _corpus() -> list[str]:
    from flux.data import load_dataset

    texts: list[str] = []
    for name in PRETRAIN_SOURCES:
        texts.extend(load_dataset(name).texts)
    return texts


def _split_test(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = max(1, int(round(n * fraction)))
    return sorted(order[n_test:]), sorted(order[:n_test])


def load_task_dataset(cfg: RunConfig):
    """The dataset named by ``cfg.dataset.name``, capped to ``max_examples`` (seeded, label-stratified
    by shuffling; the cap keeps a CPU run short)."""
    from flux.data import load_dataset

    data = load_dataset(cfg.dataset.name)
    if any(e.label is None for e in data):
        raise ValueError(f"dataset {cfg.dataset.name!r} has unlabelled examples; fine-tuning needs labels")
    if cfg.dataset.max_examples and len(data) > cfg.dataset.max_examples:
        idx = list(range(len(data)))
        random.Random(cfg.seed).shuffle(idx)
        data = data.subset(sorted(idx[: cfg.dataset.max_examples]))
    return data


def build_workload(cfg: RunConfig, *, progress: bool = True) -> Workload:
    """Data, partition, tokenizer, warm-started model: deterministic in ``cfg`` (every rank calls
    this and gets the same thing; the tokenizer and warm start come from the shared cache, built
    once under a file lock)."""
    import flux
    from flux.data.encode import encode_dataset
    from flux.data.partition import partition
    from flux.data.tokenizer import get_tokenizer
    from flux.models import MoEClassifier, pretrained_lm

    corpus = _corpus()
    tokenizer = get_tokenizer(corpus, vocab_size=cfg.dataset.vocab_size)
    data = load_task_dataset(cfg)
    label_names = sorted({e.label for e in data})
    train_idx, test_idx = _split_test(len(data), cfg.dataset.test_fraction, cfg.seed)
    train_data = data.subset(train_idx)
    parts = partition(
        train_data.labels, train_data.domains, cfg.participants, scheme=cfg.dataset.partition,
        alpha=cfg.dataset.alpha, min_size=cfg.dataset.min_size, seed=cfg.seed,
    )
    seq_len = cfg.dataset.seq_len
    encoded_train = encode_dataset(tokenizer, train_data, seq_len=seq_len, label_names=label_names)
    train = [encoded_train.subset(p) for p in parts]
    test = encode_dataset(tokenizer, data.subset(test_idx), seq_len=seq_len, label_names=label_names)

    model_spec = dict(cfg.model.overrides)
    model_spec["preset"] = cfg.model.preset
    lm, info = pretrained_lm(model_spec, tokenizer, corpus, steps=cfg.model.pretrain_steps, seq_len=seq_len,
                             seed=cfg.seed, progress=progress)
    model = MoEClassifier(lm, num_labels=len(label_names), seed=cfg.seed)
    handle = flux.patch(model.lm)
    return Workload(model=model, handle=handle, train=train, test=test, label_names=label_names,
                    pretrain_info=info)


def expert_param_ids(handle) -> set[int]:
    """ids of the original expert parameters (they are aggregated per expert, not as dense)."""
    return {id(p) for layer in handle.moe_layers for p in layer.source.expert_parameters()}


def dense_trainable(model: nn.Module, handle, mode: str) -> dict[str, nn.Parameter]:
    """The non-expert parameters that train, by ``non_expert`` mode: "frozen" (none), "head" (the
    classifier head: the task is new, the backbone is warm-started) or "tuned" (everything that is
    not an expert: attention, norms, routers, embeddings, head)."""
    if mode == "frozen":
        return {}
    if mode == "head":
        return {f"head.{n}": p for n, p in model.head.named_parameters()}
    if mode == "tuned":
        experts = expert_param_ids(handle)
        return {n: p for n, p in model.named_parameters() if id(p) not in experts}
    raise ValueError(f"non_expert must be 'frozen', 'head' or 'tuned', got {mode!r}")


def set_requires_grad(model: nn.Module, trainable: Optional[dict[str, nn.Parameter]]) -> None:
    """Freeze everything but ``trainable`` (by identity)."""
    keep = {id(p) for p in (trainable or {}).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def first_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
