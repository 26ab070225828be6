"""Offline data layer: real-text loaders, a locally trained tokenizer, non-IID partitioners.

Nothing comes from a model/data hub: ``pydoc`` (stdlib), ``chatterbot`` (PyPI package), the
OpenAI evals registry tasks (``sarcasm`` and the multiple-choice tasks; the ``evals`` wheel, fetched
with pip into the cache at run time, never committed), ``multiemo`` and the BIG-bench JSON tasks
(only from a cached ``bigbench==1.0.0`` sdist: PyPI no longer serves it) and local files.
"""
from flux.data.bigbench import (
    MC_TASKS,
    NON_LANGUAGE_TASKS,
    MCExample,
    bigbench_task_names,
    ensure_bigbench,
    load_bigbench_task,
    load_mc_examples,
    pretraining_records,
    pretraining_texts,
    split_mc,
)
from flux.data.cache import cache_dir
from flux.data.openai_evals import ensure_evals, load_sarcasm
from flux.data.partition import SCHEMES, PartitionError, label_skew, label_table, partition
from flux.data.sources import (
    DataUnavailableError,
    Dataset,
    Example,
    ensure_multiemo,
    load_chatterbot,
    load_csv,
    load_dataset,
    load_jsonl,
    load_local,
    load_multiemo,
    load_pydoc,
)
from flux.data.tokenizer import FluxTokenizer, get_tokenizer

__all__ = [
    "SCHEMES", "DataUnavailableError", "Dataset", "Example", "FluxTokenizer", "PartitionError",
    "cache_dir", "ensure_multiemo", "get_tokenizer", "label_skew", "label_table", "load_chatterbot",
    "load_csv", "load_dataset", "load_jsonl", "load_local", "load_multiemo", "load_pydoc", "partition",
    # OpenAI evals tasks (flux.data.openai_evals: the default data)
    "ensure_evals", "load_sarcasm",
    # BIG-bench tasks (flux.data.bigbench)
    "MC_TASKS", "NON_LANGUAGE_TASKS", "MCExample", "bigbench_task_names", "ensure_bigbench",
    "load_bigbench_task", "load_mc_examples", "pretraining_records", "pretraining_texts", "split_mc",
]
