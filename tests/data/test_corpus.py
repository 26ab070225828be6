"""The pretraining corpus: held-out records never trained on, sources selectable, the task data of
a run excluded from its own pretraining."""
from __future__ import annotations

import pytest

from flux.data.corpus import SOURCES, pretraining_corpus
from flux.federation.config import load_config
from flux.federation.workload import task_kind


def test_heldout_is_disjoint_and_every_nth_record():
    corpus = pretraining_corpus(("pydoc",), heldout_every=10)
    held = corpus.heldout["pydoc"]
    assert held and not set(held) & set(corpus.train)
    total = len(corpus.train) + len(held)
    assert 0.5 * total // 10 <= len(held) <= total // 10  # every 10th, less copies of training records
    assert corpus.chars["pydoc"] == sum(len(t) for t in corpus.train)


def test_sources_are_validated():
    with pytest.raises(ValueError, match="subset"):
        pretraining_corpus(("nope",))
    with pytest.raises(ValueError, match="heldout_every"):
        pretraining_corpus(("pydoc",), heldout_every=1)
    assert SOURCES == ("pydoc", "chatterbot", "openai-evals", "bigbench")


def test_a_classification_run_never_pretrains_on_its_own_dataset(monkeypatch):
    """chatterbot as the task: the corpus drops it; an instruction run keeps its task source
    (openai-evals; its evaluation tasks are excluded folder by folder instead)."""
    import flux.federation.workload as workload

    seen = {}

    def fake(sources, exclude_tasks=()):
        seen["sources"], seen["exclude"] = list(sources), exclude_tasks
        return None

    monkeypatch.setattr("flux.data.corpus.pretraining_corpus", fake)
    cfg = load_config(None, ["dataset.name=chatterbot"])
    assert task_kind(cfg) == "classification"
    workload.pretrain_corpus(cfg)
    assert seen["sources"] == ["pydoc", "openai-evals"]
    cfg = load_config(None, ["dataset.name=openai-evals", 'dataset.tasks=["crepe/samples"]'])
    assert task_kind(cfg) == "instruction"
    workload.pretrain_corpus(cfg)
    assert seen["sources"] == ["pydoc", "chatterbot", "openai-evals"] and seen["exclude"] == ("crepe/samples",)
    cfg = load_config(None, ["dataset.name=bigbench", "model.corpus=[\"pydoc\", \"bigbench\"]"])
    assert task_kind(cfg) == "instruction"  # BIG-bench from a cached sdist is still an instruction source
