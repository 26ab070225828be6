"""The task a run works on: data split among participants, a held-out test set, and the
warm-started MoE classifier.  Built identically (same seed, same cache) on every rank.

Bring your own: ``model.path`` loads a transformers MoE checkpoint (and its tokenizer) instead of
a pretrained preset, ``dataset.path`` a user's data file (classification or generative) instead
of a named dataset; :meth:`Workload.save_model` writes the fine-tuned model back in the
checkpoint's format at the end of a run (``flux.models.export``)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from typing import Optional

import torch
from torch import nn

from flux.federation.config import RunConfig
from flux.federation.errors import ConfigError

INSTRUCTION_DATASETS = ("openai-evals", "bigbench")  # dataset names that mean instruction tuning (generative)


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
        pretrain_info: what the warm start cache reported (incl. its quality report); for a
            ``model.path`` checkpoint, where it came from.
        kind: ``"classification"``, ``"instruction"`` (BIG-bench multiple choice) or
            ``"generative"`` (a user's prompt -> response pairs, ``dataset.path``).
        tokenizer: the tokenizer the data was encoded with (``FluxTokenizer`` or the checkpoint's
            own, ``flux.data.hf_tokenizer.HFTokenizer``).
        source: the ``flux.models.hf.CheckpointSource`` of a ``model.path`` run, else None.
        save: ``model.save``: whether :meth:`save_model` writes anything.
    """

    model: nn.Module
    handle: object
    train: list
    test: object
    label_names: list[str]
    pretrain_info: dict
    kind: str = "classification"
    tokenizer: object = None
    source: object = None
    save: str = "auto"

    def save_model(self, out_dir) -> Optional[str]:
        """End of a run (lead rank): the fine-tuned model in its transformers format to ``out_dir``
        (``RUN_DIR/model``; see :func:`flux.models.export.export_model`) when ``model.save`` is
        ``"always"``, or ``"auto"`` and the model came from ``model.path``; returns the directory
        written, or None."""
        if self.save == "never" or (self.save == "auto" and self.source is None):
            return None
        from flux.models.export import export_model

        return str(export_model(self, out_dir))

    @property
    def model_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def task_kind(cfg: RunConfig) -> str:
    """``"instruction"`` (openai-evals, BIG-bench), ``"classification"``, or for a user's ``dataset.path`` its
    ``dataset.task`` (``"auto"`` until the data is read: :func:`build_workload` decides)."""
    if cfg.dataset.path:
        return cfg.dataset.task
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

    # evaluation tasks are excluded task by task (whole folders), so a task source stays for
    # instruction runs; a classification dataset that is a corpus source goes
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


def _cap(items: list, limit: int, seed: int) -> list:
    """A seeded subset of at most ``limit`` items (0 = all), in their original order."""
    if not limit or len(items) <= limit:
        return items
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    return [items[i] for i in sorted(idx[:limit])]


def _user_rows(cfg: RunConfig) -> tuple[list[dict], Optional[list[dict]]]:
    """The rows of ``dataset.path`` and of the held-out set when one is given (``test_path`` or
    ``test_split``), each capped to ``max_examples``; data problems become ConfigErrors."""
    from pathlib import Path

    from flux.data.sources import DataUnavailableError
    from flux.data.tables import TableError, load_rows

    d = cfg.dataset
    if d.test_split and not d.test_path and not Path(d.path).is_dir():
        raise ConfigError("dataset.test_split", f"names a split of a DatasetDict directory; {d.path} is a file "
                          "(give the held-out file as dataset.test_path)")

    def load(path: str, split: str, key: str) -> list[dict]:
        try:
            return load_rows(path, split)
        except (FileNotFoundError, TableError, DataUnavailableError) as exc:
            raise ConfigError(key, str(exc)) from None

    rows = load(d.path, d.split, "dataset.path")
    test = None
    if d.test_path:
        test = load(d.test_path, d.test_split or d.split, "dataset.test_path")
    elif d.test_split:
        test = load(d.path, d.test_split, "dataset.test_split")
    rows = _cap(rows, d.max_examples, cfg.seed)
    if test is not None:
        test = _cap(test, d.max_examples, cfg.seed + 1)
    return rows, test


def _partition(cfg: RunConfig, labels, domains) -> list[list[int]]:
    from flux.data.partition import PartitionError, partition

    d = cfg.dataset
    try:
        return partition(labels, domains, cfg.participants, scheme=d.partition, alpha=d.alpha,
                         min_size=d.min_size, seed=cfg.seed)
    except PartitionError as exc:
        raise ConfigError("dataset.partition", str(exc)) from None


def _user_data(cfg: RunConfig, tokenizer):
    """``dataset.path``: ``(kind, train shards, test set, names)`` of a user's classification
    (text + label columns) or generative (prompt + response columns) data."""
    from flux.data.tables import TableError, detect_task

    d = cfg.dataset
    rows, test_rows = _user_rows(cfg)
    try:
        kind = d.task if d.task != "auto" else detect_task(
            rows, prompt_column=d.prompt_column, response_column=d.response_column, label_column=d.label_column,
            text_column=d.text_column, where=d.path)
        if kind == "classification":
            return ("classification", *_user_classification(cfg, tokenizer, rows, test_rows))
        return ("generative", *_user_generative(cfg, tokenizer, rows, test_rows))
    except TableError as exc:
        raise ConfigError("dataset.path", str(exc)) from None


def _user_classification(cfg: RunConfig, tokenizer, rows, test_rows):
    from flux.data.encode import encode_dataset
    from flux.data.tables import classification_examples, sorted_labels

    d = cfg.dataset
    cols = dict(text_column=d.text_column, label_column=d.label_column, domain_column=d.domain_column)
    data = classification_examples(rows, where=d.path, **cols)
    if test_rows is None:
        train_idx, test_idx = _split_test(len(data), d.test_fraction, cfg.seed)
        train_data, test_data = data.subset(train_idx), data.subset(test_idx)
    else:
        train_data, test_data = data, classification_examples(test_rows, where=d.test_path or d.path, **cols)
    label_names = sorted_labels(train_data.labels)
    if len(label_names) < 2:
        raise ConfigError("dataset.label_column", f"{d.label_column!r} has {len(label_names)} distinct value(s) in the "
                          "training data; classification needs at least 2")
    unseen = sorted(set(test_data.labels) - set(label_names))
    if unseen:
        raise ConfigError("dataset.label_column", f"held-out labels {unseen[:5]} never occur in the training data")
    parts = _partition(cfg, train_data.labels, train_data.domains)
    encoded = encode_dataset(tokenizer, train_data, seq_len=d.seq_len, label_names=label_names)
    test = encode_dataset(tokenizer, test_data, seq_len=d.seq_len, label_names=label_names)
    return [encoded.subset(p) for p in parts], test, label_names


def _user_generative(cfg: RunConfig, tokenizer, rows, test_rows):
    from flux.data.instructions import encode_pairs
    from flux.data.tables import generative_pairs

    d = cfg.dataset
    if d.partition != "iid" and not d.domain_column:
        raise ConfigError("dataset.partition", f"{d.partition!r} on a generative dataset needs dataset.domain_column "
                          "(there are no labels to skew); use dataset.partition = \"iid\" or name a domain column")
    cols = dict(prompt_column=d.prompt_column, response_column=d.response_column, domain_column=d.domain_column)
    pairs = generative_pairs(rows, where=d.path, **cols)
    if test_rows is None:
        train_idx, test_idx = _split_test(len(pairs), d.test_fraction, cfg.seed)
        train_pairs, test_pairs = [pairs[i] for i in train_idx], [pairs[i] for i in test_idx]
    else:
        train_pairs, test_pairs = pairs, generative_pairs(test_rows, where=d.test_path or d.path, **cols)
    domains = [p.domain for p in train_pairs]
    parts = _partition(cfg, domains if d.domain_column else None, domains)
    chat = bool(d.chat_template and getattr(tokenizer, "has_chat_template", False))
    encoded = encode_pairs(tokenizer, train_pairs, seq_len=d.seq_len, chat_template=chat)
    test = encode_pairs(tokenizer, test_pairs, seq_len=d.seq_len, chat_template=chat)
    names = sorted({p.domain for p in train_pairs if p.domain is not None}) or ["all"]
    return [encoded.subset(p) for p in parts], test, names


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
    """Multiple-choice tasks (openai-evals or BIG-bench) as prompt -> answer pairs, partitioned by
    task (a participant holds one task's data, as in federated instruction tuning); the test set is
    a held-out share of every task, scored by log-likelihood ranking of the choices."""
    from flux.data import bigbench, openai_evals
    from flux.data.instructions import encode_choices, encode_instructions
    from flux.data.partition import partition
    from flux.data.task_store import split_mc

    source = openai_evals if cfg.dataset.name == "openai-evals" else bigbench
    tasks = list(cfg.dataset.tasks) or list(source.MC_TASKS)
    examples = fitting_examples(source.load_mc_examples(tasks, max_per_task=cfg.dataset.max_per_task, seed=cfg.seed),
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
    once under a file lock).  With ``model.path`` the model (and its tokenizer, if it brought one)
    comes from the user's checkpoint; with ``dataset.path`` the data from the user's file."""
    import flux
    from flux.data.tokenizer import get_tokenizer
    from flux.models import MoEClassifier, pretrained_lm
    from flux.models.causal import MoECausalLM

    m = cfg.model
    corpus = None
    if m.path:
        tokenizer = _checkpoint_tokenizer(cfg)
    else:
        corpus = pretrain_corpus(cfg)
        tokenizer = get_tokenizer(corpus.train, vocab_size=cfg.dataset.vocab_size)
    if cfg.dataset.path:
        kind, train, test, names = _user_data(cfg, tokenizer)
    elif task_kind(cfg) == "instruction":
        kind, (train, test, names) = "instruction", _instruction_data(cfg, tokenizer)
    else:
        kind, (train, test, names) = "classification", _classification_data(cfg, tokenizer)
    source = None
    if m.path:
        lm, source, info = _checkpoint_lm(cfg, tokenizer, progress)
    else:
        model_spec = dict(m.overrides)
        model_spec["preset"] = m.preset
        with all_threads():  # a one-time, cached job: use the whole machine even in deterministic runs
            lm, info = pretrained_lm(model_spec, tokenizer, corpus.train, steps=m.pretrain_steps,
                                     seq_len=m.pretrain_seq_len, batch_size=m.pretrain_batch_size, lr=m.pretrain_lr,
                                     seed=m.pretrain_seed, progress=progress, heldout=corpus.heldout)
    if kind == "classification":
        model = MoEClassifier(lm, num_labels=len(names), seed=cfg.seed)
    else:
        model = MoECausalLM(lm, mc_metric=cfg.dataset.mc_metric)
    handle = flux.patch(model.lm)
    return Workload(model=model, handle=handle, train=train, test=test, label_names=names,
                    pretrain_info=info, kind=kind, tokenizer=tokenizer, source=source, save=m.save)


def _checkpoint_tokenizer(cfg: RunConfig):
    """The tokenizer saved with the ``model.path`` checkpoint, else FLUX's byte-level BPE (trained
    on ``model.corpus`` with ``dataset.vocab_size`` tokens, as for the presets: the tokenizer of a
    checkpoint ``flux pretrain`` wrote)."""
    from flux.data.hf_tokenizer import HFTokenizer, has_tokenizer
    from flux.data.tokenizer import get_tokenizer
    from flux.models.hf import check_checkpoint_dir

    m = cfg.model
    try:
        check_checkpoint_dir(m.path, trust_remote_code=m.trust_remote_code)  # a wrong path fails at once
    except ValueError as exc:
        raise ConfigError("model.path", str(exc)) from None
    if has_tokenizer(m.path):
        try:
            return HFTokenizer.from_pretrained(m.path, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError("model.path", f"cannot load the tokenizer saved in {m.path}: {exc}") from None
    return get_tokenizer(pretrain_corpus(cfg).train, vocab_size=cfg.dataset.vocab_size)


def _checkpoint_lm(cfg: RunConfig, tokenizer, progress: bool):
    """``(lm, source, info)`` of the ``model.path`` checkpoint; the tokenizer must fit its vocabulary."""
    from flux.data.hf_tokenizer import HFTokenizer
    from flux.models.hf import load_lm

    m = cfg.model
    try:
        lm, source = load_lm(m.path, dtype=m.dtype, trust_remote_code=m.trust_remote_code, progress=progress)
    except (OSError, ValueError) as exc:
        raise ConfigError("model.path", str(exc)) from None
    rows = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        key = "model.path" if isinstance(tokenizer, HFTokenizer) else "dataset.vocab_size"
        raise ConfigError(key, f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's embedding only "
                          f"{rows} rows" + ("" if key == "model.path" else
                                            f"; set dataset.vocab_size <= {rows} or save a tokenizer with the checkpoint"))
    info = {"cache_hit": False, "path": source.path, "model_type": source.model_type, "dtype": str(source.dtype),
            "tokenizer": "checkpoint" if isinstance(tokenizer, HFTokenizer) else "flux byte-level BPE"}
    return lm, source, info


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
