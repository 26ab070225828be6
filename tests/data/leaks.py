"""Shared check of the pretraining/evaluation disjointness tests: evaluation inputs found in a corpus."""
from __future__ import annotations

import collections
from typing import Sequence


def corpus_leaks(corpus: Sequence[str], inputs: Sequence[str], k: int = 30) -> tuple[list[str], int]:
    """``(leaks, long_inputs)``: the ``inputs`` that are a whole corpus text, or (when at least
    ``k`` characters) a substring of the corpus, and how many inputs were long enough for the
    substring check.  Indexes the inputs' ``k``-character prefixes and slides a window once over
    the joined corpus (a few seconds for ~7 M characters)."""
    text_set, joined = set(corpus), "\n".join(corpus)
    leaks = [t for t in inputs if t in text_set]
    by_prefix: dict[str, list[str]] = collections.defaultdict(list)
    for text in inputs:
        if len(text) >= k:
            by_prefix[text[:k]].append(text)  # templated tasks share prefixes: a list per key
    for i in range(len(joined) - k + 1):
        hits = by_prefix.get(joined[i:i + k])
        if hits:
            leaks.extend(t for t in hits if joined.startswith(t, i))
    return leaks, sum(len(v) for v in by_prefix.values())
