"""Split a dataset's examples among federated participants (IID and non-IID).

Schemes (all deterministic for a given ``seed``; each returns disjoint index lists covering every
example exactly once, each list sorted):

* ``iid``       -- a random permutation cut into ``num_participants`` near-equal shares.
* ``dirichlet`` -- label skew: for every label, participant shares are drawn from
                   Dir(alpha * 1); small alpha = each participant sees few labels, large alpha ->
                   IID.  Draws are repeated (bounded) until every participant has ``min_size``.
* ``domain``    -- natural-key skew: examples stay with their domain.  With at least as many
                   participants as domains, each domain gets one or more participants (in
                   proportion to its size) and is split evenly among them; with fewer, whole domains
                   are packed onto participants (largest first onto the least loaded).

:func:`label_table` renders the per-participant label counts as a markdown table and
:func:`label_skew` summarises how far participants are from the global label mix.
"""
from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence

import numpy as np

SCHEMES = ("iid", "dirichlet", "domain")


class PartitionError(ValueError):
    """The requested partition is impossible (or was not found within the retry budget)."""


def partition(
    labels: Sequence[Hashable | None] | None,
    domains: Sequence[Hashable | None] | None,
    num_participants: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    min_size: int = 1,
    seed: int = 0,
    max_retries: int = 1000,
) -> list[list[int]]:
    """Indices of each participant's examples.

    ``labels`` is needed by ``dirichlet`` and ``domains`` by ``domain``; either may be None
    otherwise (``iid`` only needs the length, taken from whichever is given).  ``min_size`` is the
    minimum number of examples per participant; a partition that cannot meet it raises
    :class:`PartitionError` with what to change.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if num_participants < 1:
        raise ValueError(f"num_participants must be >= 1, got {num_participants}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    ref = labels if labels is not None else domains
    if ref is None:
        raise ValueError("partition needs labels or domains (to know the number of examples)")
    n = len(ref)
    if labels is not None and domains is not None and len(labels) != len(domains):
        raise ValueError(f"labels ({len(labels)}) and domains ({len(domains)}) differ in length")
    if n < num_participants * min_size:
        raise PartitionError(
            f"{n} examples cannot give {num_participants} participants {min_size} each: "
            f"use fewer participants or a smaller min_size")
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_participants)
    elif scheme == "dirichlet":
        parts = _dirichlet(_require(labels, "labels", scheme), num_participants, alpha, min_size, rng, max_retries)
    else:
        parts = _by_domain(_require(domains, "domains", scheme), num_participants, rng)

    result = [sorted(int(i) for i in p) for p in parts]
    small = [j for j, p in enumerate(result) if len(p) < min_size]
    if small:
        sizes = ", ".join(f"participant {j}: {len(result[j])}" for j in small[:5])
        raise PartitionError(f"{scheme} partition leaves participants below min_size={min_size} ({sizes}); "
                             "use fewer participants or a smaller min_size")
    return result


def _require(values: Sequence[Hashable | None] | None, what: str, scheme: str) -> np.ndarray:
    """Integer codes of ``values`` (sorted by value), or a clear error if they are missing."""
    if values is None or any(v is None for v in values):
        raise PartitionError(f"the {scheme!r} scheme needs {what} for every example; this dataset has none/some missing")
    uniques = sorted(set(values), key=str)
    code = {v: i for i, v in enumerate(uniques)}
    return np.fromiter((code[v] for v in values), dtype=np.int64, count=len(values))


def _dirichlet(codes: np.ndarray, num: int, alpha: float, min_size: int, rng: np.random.Generator,
               max_retries: int) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019; the FedML/FedLab recipe), redrawn until min_size holds."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    n = len(codes)
    by_class = [np.flatnonzero(codes == c) for c in range(int(codes.max()) + 1)]
    best = 0
    for _ in range(max(1, max_retries)):
        parts: list[list[np.ndarray]] = [[] for _ in range(num)]
        sizes = np.zeros(num, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num, alpha))
            # Participants already at their fair share get nothing more of this label: keeps the
            # sizes from degenerating while leaving the label mix skewed.
            p = p * (sizes < n / num)
            p = p / p.sum() if p.sum() > 0 else np.full(num, 1.0 / num)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].append(chunk)
                sizes[j] += len(chunk)
        if sizes.min() >= min_size:
            return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]
        best = max(best, int(sizes.min()))
    raise PartitionError(
        f"dirichlet(alpha={alpha}) found no split giving all {num} participants >= {min_size} examples "
        f"in {max_retries} draws (best smallest share: {best}); raise alpha, lower min_size or use fewer participants")


def _by_domain(codes: np.ndarray, num: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Natural-key split: domains are never mixed on a participant when num >= #domains."""
    by_domain = [np.flatnonzero(codes == d) for d in range(int(codes.max()) + 1)]
    sizes = np.array([len(ix) for ix in by_domain], dtype=np.float64)
    n_dom = len(by_domain)
    if num >= n_dom:
        # One participant per domain, then the rest one at a time to the domain with the most
        # examples per participant (largest-share apportionment): shares stay near-equal.
        count = np.ones(n_dom, dtype=np.int64)
        for _ in range(num - n_dom):
            count[int(np.argmax(sizes / count))] += 1
        parts: list[np.ndarray] = []
        for ix, k in zip(by_domain, count):
            parts.extend(np.array_split(rng.permutation(ix), int(k)))
        return parts
    # Fewer participants than domains: pack whole domains, largest first onto the least loaded.
    load = np.zeros(num, dtype=np.int64)
    owned: list[list[np.ndarray]] = [[] for _ in range(num)]
    for d in sorted(range(n_dom), key=lambda d: (-sizes[d], d)):
        j = int(np.argmin(load))
        owned[j].append(by_domain[d])
        load[j] += len(by_domain[d])
    return [np.concatenate(o) for o in owned]


def label_counts(parts: Sequence[Sequence[int]], labels: Sequence[Hashable | None]) -> list[Counter]:
    """Per-participant Counter of labels."""
    return [Counter(labels[i] for i in p) for p in parts]


def label_skew(parts: Sequence[Sequence[int]], labels: Sequence[Hashable | None]) -> float:
    """Mean total-variation distance between each participant's label mix and the global one.

    0 = every participant looks like the whole dataset; close to 1 = disjoint label sets.
    Empty participants are ignored.
    """
    total = Counter(labels[i] for p in parts for i in p)
    n = sum(total.values())
    if n == 0:
        return 0.0
    dists = []
    for counts in label_counts(parts, labels):
        m = sum(counts.values())
        if m:
            dists.append(0.5 * sum(abs(counts.get(k, 0) / m - total[k] / n) for k in total))
    return float(np.mean(dists)) if dists else 0.0


def label_table(parts: Sequence[Sequence[int]], labels: Sequence[Hashable | None],
                domains: Sequence[Hashable | None] | None = None, max_labels: int | None = None) -> str:
    """Markdown table: one row per participant, one column per label, row and column totals.

    With ``domains`` an extra column lists each participant's domains (useful for the ``domain``
    scheme).  Unlabelled examples are counted under ``(none)``.  With ``max_labels`` only the most
    frequent ``max_labels`` labels get a column and the rest are summed under ``(other)`` (the
    pydoc corpus has 79 labels).
    """
    per = label_counts(parts, labels)
    overall = Counter()
    for c in per:
        overall.update(c)
    keys: list = sorted(overall, key=lambda k: (k is None, str(k)))
    other = False
    if max_labels is not None and len(keys) > max_labels:
        top = {k for k, _ in sorted(overall.items(), key=lambda kv: (-kv[1], str(kv[0])))[:max_labels]}
        keys = [k for k in keys if k in top]
        other = True
    names = ["(none)" if k is None else str(k) for k in keys] + (["(other)"] if other else [])

    def cells(counts: Counter, size: int) -> list[str]:
        shown = [counts.get(k, 0) for k in keys]
        return [str(v) for v in shown] + ([str(size - sum(shown))] if other else []) + [str(size)]

    header = ["participant", *(["domains"] if domains is not None else []), *names, "total"]
    rows = []
    for j, (p, counts) in enumerate(zip(parts, per)):
        row = [str(j)]
        if domains is not None:
            doms = sorted({str(domains[i]) for i in p})
            row.append(", ".join(doms) if len(doms) <= 3 else f"{', '.join(doms[:3])} +{len(doms) - 3}")
        rows.append(row + cells(counts, len(p)))
    totals = ["total", *([""] if domains is not None else []), *cells(overall, sum(len(p) for p in parts))]
    rows.append(totals)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    left = 2 if domains is not None else 1  # text columns are left-aligned, counts right-aligned

    def fmt(r: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if c < left else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))) + " |"

    rule = "| " + " | ".join(("-" * w) if c < left else ("-" * (w - 1) + ":") for c, w in enumerate(widths)) + " |"
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])
