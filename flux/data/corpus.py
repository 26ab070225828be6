"""The pretraining corpus: all the offline English text there is, minus every evaluation task.

Sources (``SOURCES``): ``pydoc`` (the stdlib's help topics), ``chatterbot`` (chatterbot-corpus
dialogs), ``openai-evals`` (the text of the OpenAI evals registry tasks, without non-language and
foreign-language tasks and without the folders of every task used for evaluation, see
:func:`flux.data.openai_evals.pretraining_records`) and, where its no longer downloadable sdist is
cached, ``bigbench`` (the same for BIG-bench, :func:`flux.data.bigbench.pretraining_records`).
``DEFAULT_SOURCES`` are the three that install anywhere.  MultiEmo is never pretrained on.  Every
``heldout_every``-th record of each source is held out for the quality report (perplexity,
routing specialisation per source).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

SOURCES = ("pydoc", "chatterbot", "openai-evals", "bigbench")
DEFAULT_SOURCES = ("pydoc", "chatterbot", "openai-evals")


@dataclasses.dataclass
class PretrainCorpus:
    """Attributes:
        train: the training texts, in a fixed order.
        heldout: source -> held-out texts (never in ``train``).
        chars: source -> characters of its training texts.
    """

    train: list[str]
    heldout: dict[str, list[str]]
    chars: dict[str, int]


def source_texts(source: str, *, exclude_tasks: Sequence[str] = ()) -> list[str]:
    """The texts of one source of :data:`SOURCES`."""
    if source == "openai-evals":
        from flux.data.openai_evals import pretraining_texts

        return pretraining_texts(exclude=tuple(exclude_tasks))
    if source == "bigbench":
        from flux.data.bigbench import MC_TASKS, pretraining_texts

        return pretraining_texts(exclude=tuple(MC_TASKS) + tuple(exclude_tasks))
    if source in ("pydoc", "chatterbot"):
        from flux.data.sources import load_dataset

        return load_dataset(source).texts
    raise ValueError(f"unknown corpus source {source!r}; known: {', '.join(SOURCES)}")


def pretraining_corpus(sources: Sequence[str] = DEFAULT_SOURCES, *, exclude_tasks: Sequence[str] = (),
                       heldout_every: int = 50) -> PretrainCorpus:
    """The corpus of ``sources``; the task sources never include their evaluation tasks
    (:data:`flux.data.openai_evals.MC_TASKS` and the sarcasm task, :data:`flux.data.bigbench.MC_TASKS`)
    nor ``exclude_tasks``, at the level of whole task folders."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"corpus sources must be a non-empty subset of {SOURCES}, got {list(sources)}")
    train: list[str] = []
    heldout: dict[str, list[str]] = {}
    chars: dict[str, int] = {}
    for source in dict.fromkeys(sources):  # de-duplicated, order kept
        texts = [t for t in source_texts(source, exclude_tasks=exclude_tasks) if t]
        kept = [t for i, t in enumerate(texts) if i % heldout_every != heldout_every - 1]
        # exact duplicates (pydoc repeats sections across topics) must not leak into the held-out set
        seen = set(kept)
        heldout[source] = [t for i, t in enumerate(texts) if i % heldout_every == heldout_every - 1 and t not in seen]
        chars[source] = sum(len(t) for t in kept)
        train.extend(kept)
    return PretrainCorpus(train=train, heldout=heldout, chars=chars)
