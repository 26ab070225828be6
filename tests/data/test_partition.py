"""Partitioner properties on the real corpora: disjoint, complete, min_size, skew vs alpha,
seeded determinism; the natural-key split; the label table and the `flux partition` command."""
from __future__ import annotations

import numpy as np
import pytest

from flux.data.partition import PartitionError, label_skew, label_table, partition
from flux.data.sources import load_chatterbot, load_dataset, load_pydoc
from tests.data.test_openai_evals import evals_dir  # noqa: F401  (fixture: fetches the evals wheel once; CI must)


@pytest.fixture(scope="module")
def chatterbot():
    return load_chatterbot()


@pytest.fixture(scope="module")
def pydoc():
    return load_pydoc()


@pytest.fixture(scope="module")
def sarcasm(evals_dir):  # noqa: F811 (the imported fixture, requested by name)
    return load_dataset("sarcasm")


def check_exact_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert len(flat) == n and sorted(flat) == list(range(n)), "not a disjoint cover"
    assert all(p == sorted(p) for p in parts)
    assert all(isinstance(i, int) for p in parts for i in p)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "domain"])
@pytest.mark.parametrize("num", [1, 3, 7, 21, 40])
def test_cover_min_size_and_determinism(chatterbot, scheme, num):
    kw = dict(scheme=scheme, alpha=0.5, min_size=5, seed=3)
    if scheme == "domain" and num >= 21:
        # A participant per topic or more: the 1-conversation 'health' topic cannot give 5 each.
        with pytest.raises(PartitionError, match="below min_size=5"):
            partition(chatterbot.labels, chatterbot.domains, num, **kw)
        kw["min_size"] = 1
    parts = partition(chatterbot.labels, chatterbot.domains, num, **kw)
    assert len(parts) == num
    check_exact_cover(parts, len(chatterbot))
    assert min(len(p) for p in parts) >= kw["min_size"]
    assert parts == partition(chatterbot.labels, chatterbot.domains, num, **kw)


def test_seed_changes_the_split(pydoc):
    a = partition(pydoc.labels, None, 5, scheme="dirichlet", seed=0)
    b = partition(pydoc.labels, None, 5, scheme="dirichlet", seed=1)
    assert a != b


def test_iid_sizes_are_balanced(pydoc):
    parts = partition(pydoc.labels, None, 8, scheme="iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def mean_skew(labels, alpha, num=10, seeds=range(5)):
    return float(np.mean([label_skew(partition(labels, None, num, scheme="dirichlet", alpha=alpha, seed=s), labels)
                          for s in seeds]))


def test_dirichlet_skew_grows_as_alpha_shrinks(pydoc):
    labels = pydoc.labels
    skews = [mean_skew(labels, a) for a in (100.0, 1.0, 0.1)]
    iid = np.mean([label_skew(partition(labels, None, 10, scheme="iid", seed=s), labels) for s in range(5)])
    assert skews[0] < skews[1] < skews[2], skews
    assert skews[0] < iid + 0.1  # large alpha ~ iid
    assert skews[2] > 0.6


def test_dirichlet_min_size_resamples_or_fails_clearly(chatterbot):
    parts = partition(chatterbot.labels, None, 20, scheme="dirichlet", alpha=0.05, min_size=20, seed=0)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(PartitionError, match="raise alpha"):
        partition(chatterbot.labels, None, 20, scheme="dirichlet", alpha=0.01, min_size=100, seed=0, max_retries=5)
    with pytest.raises(PartitionError, match="cannot give"):
        partition(chatterbot.labels, None, 100, scheme="iid", min_size=21)


def test_domain_scheme_keeps_domains_apart(chatterbot):
    labels, domains = chatterbot.labels, chatterbot.domains
    # More participants than topics: every participant holds exactly one topic, every topic is covered.
    parts = partition(labels, domains, 30, scheme="domain")
    assert all(len({domains[i] for i in p}) == 1 for p in parts)
    assert len({domains[p[0]] for p in parts}) == 21
    # Fewer participants than topics: whole topics are packed, never split.
    parts = partition(labels, domains, 4, scheme="domain")
    owner = {}
    for j, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(domains[i], j) == j


def test_domain_scheme_needs_domains(pydoc):
    with pytest.raises(PartitionError, match="needs domains"):
        partition(pydoc.labels, pydoc.domains, 4, scheme="domain")


def test_sarcasm_partitions(sarcasm):
    labels, domains = sarcasm.labels, sarcasm.domains
    with pytest.raises(PartitionError, match="needs domains"):  # headlines have no natural domain
        partition(labels, domains, 8, scheme="domain", seed=0)
    mild = partition(labels, domains, 8, scheme="dirichlet", alpha=5.0, min_size=8, seed=0)  # the default job's
    skewed = partition(labels, domains, 8, scheme="dirichlet", alpha=0.1, min_size=50, seed=0)
    for parts in (mild, skewed):
        check_exact_cover(parts, len(sarcasm))
    iid = label_skew(partition(labels, domains, 8, seed=0), labels)
    assert iid < label_skew(mild, labels) < label_skew(skewed, labels)


def test_label_table_counts(chatterbot):
    parts = partition(chatterbot.labels, chatterbot.domains, 3, scheme="iid", seed=0)
    table = label_table(parts, chatterbot.labels)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 1
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "participant" and header[-1] == "total" and len(header) == 21 + 2
    totals = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert totals[0] == "total" and totals[-1] == str(len(chatterbot))
    col = header.index("tech_support")
    assert totals[col] == "1050"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:-1]]
    assert sum(int(r[col]) for r in rows) == 1050
    assert all(int(r[-1]) == sum(int(v) for v in r[1:-1]) for r in rows)


def test_label_table_other_column_and_domains(pydoc, chatterbot):
    parts = partition(pydoc.labels, None, 2, seed=0)
    table = label_table(parts, pydoc.labels, max_labels=5)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert len(header) == 1 + 5 + 2 and header[-2] == "(other)"
    assert table.splitlines()[-1].strip("|").split("|")[-1].strip() == str(len(pydoc))
    parts = partition(chatterbot.labels, chatterbot.domains, 25, scheme="domain")
    assert "| domains" in label_table(parts, chatterbot.labels, chatterbot.domains)


def test_flux_partition_command(capsys):
    from flux.cli import main

    assert main(["partition", "--dataset", "chatterbot", "--participants", "4", "--scheme", "dirichlet",
                 "--alpha", "0.3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "chatterbot: 2026 examples, 21 labels" in out and "| participant" in out and "label skew" in out
    assert main(["partition", "--dataset", "pydoc", "--participants", "3", "--scheme", "domain"]) == 2
    assert "needs domains" in capsys.readouterr().err


def test_partition_main_on_local_file(tmp_path, capsys):
    from flux.data.cli import partition_main

    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}", "src": "s{i % 3}"}}\n' for i in range(30)))
    assert partition_main(["--dataset", str(path), "--participants", "3", "--scheme", "domain",
                           "--domain-key", "src"]) == 0
    out = capsys.readouterr().out
    assert "tiny: 30 examples, 2 labels, 3 domains" in out and "| total" in out
