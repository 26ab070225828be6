"""The task a run works on: data split among participants, a held-out test set, and the
warm-started MoE classifier.  Built identically (same seed, same cache) on every rank."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from typing import Optional

import torch
from torch import nn

from flux.federation.config import RunConfig

INSTRUCTION_DATASETS = ("bigbench",)  # dataset names that mean instruction tuning (generative)


@dataclasses.dataclass
class Workload:
    """Everything a rank needs to run participants.

    Attributes:
        model: the global model (a ``flux.models.MoEClassifier``, or a
            ``flux.models.causal.MoECausalLM`` for instruction tuning), patched (``handle``).
        handle: ``flux.patch`` handle of ``model.lm``.
        train: per participant, its training data (``EncodedDataset`` or ``EncodedInstructions``).
        test: the held-out data (``EncodedDataset``, or ``EncodedChoices`` scored by log-likelihood).
        label_names: class names (classification) or task names (instruction tuning).
        pretrain_info: what the warm start cache reported (incl. its quality report).
        kind: ``"classification"`` or ``"instruction"``.
    """

    model: nn.Module
    handle: object
    train: list
    test: object
    label_names: list[str]
    pretrain_info: dict
    kind: str = "classification"

    @property
    def model_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def task_kind(cfg: RunConfig) -> str:
    return "instruction" if cfg.dataset.name in INSTRUCTION_DATASETS else "classification"


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


def pretrain_corpus(cfg: RunConfig):
    """The ``flux.data.corpus.PretrainCorpus`` of ``cfg.model.corpus``, minus the run's own task
    data (a classification run on a corpus source drops that source)."""
    from flux.data.corpus import pretraining_corpus

    # BIG-bench evaluation tasks are excluded task by task (whole folders), so the bigbench
    # source stays for instruction runs; a classification dataset that is a corpus source goes
    sources = [s for s in cfg.model.corpus if s != cfg.dataset.name or task_kind(cfg) == "instruction"]
    if not sources:
        raise ValueError(f"model.corpus {cfg.model.corpus} has nothing left once the task data "
                         f"({cfg.dataset.name}) is excluded from pretraining")
    return pretraining_corpus(sources, exclude_tasks=tuple(cfg.dataset.tasks))


def _classification_data(cfg: RunConfig, tokenizer):
    from flux.data.encode import encode_dataset
    from flux.data.partition import partition

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
    return train, test, label_names


MIN_PROMPT_TOKENS = 16  # an example is kept only if its longest choice leaves this much prompt


def fitting_examples(examples: list, tokenizer, seq_len: int) -> list:
    """The multiple-choice examples whose longest choice fits ``seq_len`` with at least
    :data:`MIN_PROMPT_TOKENS` of prompt (longer prompts are cut from the left when encoded; a
    choice is never cut, so an example whose choice cannot fit is left out)."""
    room = seq_len - 1 - MIN_PROMPT_TOKENS
    lengths = [len(ids) for ids in _choice_ids(tokenizer, examples)]
    keep, cursor = [], 0
    for e in examples:
        n = len(e.choices)
        if max(lengths[cursor:cursor + n]) <= room:
            keep.append(e)
        cursor += n
    return keep


def _choice_ids(tokenizer, examples: list) -> list[list[int]]:
    texts = [" " + c for e in examples for c in e.choices]
    return [enc.ids for enc in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []


def _instruction_data(cfg: RunConfig, tokenizer):
    """BIG-bench multiple-choice tasks as prompt -> answer pairs, partitioned by task (a
    participant holds one task's data, as in federated instruction tuning); the test set is a
    held-out share of every task, scored by log-likelihood ranking of the choices."""
    from flux.data.bigbench import MC_TASKS, load_mc_examples, split_mc
    from flux.data.instructions import encode_choices, encode_instructions
    from flux.data.partition import partition

    tasks = list(cfg.dataset.tasks) or list(MC_TASKS)
    examples = fitting_examples(load_mc_examples(tasks, max_per_task=cfg.dataset.max_per_task, seed=cfg.seed),
                                tokenizer, cfg.dataset.seq_len)
    train_ex, test_ex = split_mc(examples, cfg.dataset.test_per_task, cfg.seed)
    task_of = [e.task for e in train_ex]
    parts = partition(task_of, task_of, cfg.participants, scheme=cfg.dataset.partition,
                      alpha=cfg.dataset.alpha, min_size=cfg.dataset.min_size, seed=cfg.seed)
    seq_len = cfg.dataset.seq_len
    encoded = encode_instructions(tokenizer, train_ex, seq_len=seq_len)
    return [encoded.subset(p) for p in parts], encode_choices(tokenizer, test_ex, seq_len=seq_len), sorted(set(tasks))


@contextlib.contextmanager
def all_threads():
    """Every core for the block (torch's intra-op threads), the caller's setting afterwards.

    ``FLUX_MAX_THREADS`` caps it: ``flux bench`` runs several single-threaded runs side by side,
    and OpenMP threads that outnumber the cores spin against each other (10-50x slower)."""
    before = torch.get_num_threads()
    cap = int(os.environ.get("FLUX_MAX_THREADS", "0") or 0)
    torch.set_num_threads(max(1, min(cap, os.cpu_count() or 1) if cap > 0 else (os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_workload(cfg: RunConfig, *, progress: bool = True) -> Workload:
    """Data, partition, tokenizer, warm-started model: deterministic in ``cfg`` (every rank calls
    this and gets the same thing; the tokenizer and warm start come from the shared cache, built
    once under a file lock)."""
    import flux
    from flux.data.tokenizer import get_tokenizer
    from flux.models import MoEClassifier, pretrained_lm
    from flux.models.causal import MoECausalLM

    corpus = pretrain_corpus(cfg)
    tokenizer = get_tokenizer(corpus.train, vocab_size=cfg.dataset.vocab_size)
    kind = task_kind(cfg)
    if kind == "instruction":
        train, test, names = _instruction_data(cfg, tokenizer)
    else:
        train, test, names = _classification_data(cfg, tokenizer)
    m = cfg.model
    model_spec = dict(m.overrides)
    model_spec["preset"] = m.preset
    with all_threads():  # a one-time, cached job: use the whole machine even in deterministic runs
        lm, info = pretrained_lm(model_spec, tokenizer, corpus.train, steps=m.pretrain_steps, seq_len=m.pretrain_seq_len,
                                 batch_size=m.pretrain_batch_size, lr=m.pretrain_lr, seed=m.pretrain_seed,
                                 progress=progress, heldout=corpus.heldout)
    model = MoECausalLM(lm, mc_metric=cfg.dataset.mc_metric) if kind == "instruction" else MoEClassifier(lm, num_labels=len(names), seed=cfg.seed)
    handle = flux.patch(model.lm)
    return Workload(model=model, handle=handle, train=train, test=test, label_names=names,
                    pretrain_info=info, kind=kind)


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
