"""OpenAI evals registry tasks (the default data): conversion of chat samples to task records,
multiple-choice sets, the sarcasm classification data and a pretraining corpus disjoint from every
evaluation task.  Synthetic wheels are made of our own strings; the real-data tests use the
``evals==3.0.1.post1`` wheel, fetched once into the cache (CI must fetch it: a skip there would
hide a broken default job)."""
from __future__ import annotations

import collections
import json
import os
import time
import zipfile

import pytest

from flux.data import openai_evals as oe
from flux.data import task_store
from flux.data.sources import DataUnavailableError, load_dataset
from tests.data.leaks import corpus_leaks


def _sample(system: str, user: str, ideal) -> str:
    return json.dumps({"input": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                       "ideal": ideal})


def _wheel(path, files: dict[str, list[str]]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, lines in files.items():
            z.writestr(name, "\n".join(lines) + "\n")


D = "evals/registry/data/"


def test_convert_samples_multiple_choice_rules():
    lines = [_sample("Say yes or no.", f"question {i}?", "yes" if i % 2 else "no") for i in range(6)]
    lines += ["", "not json", json.dumps(["a list"]), json.dumps({"sample": []})]  # skipped
    records = oe.convert_samples(lines)
    assert len(records) == 6
    assert records[0] == {"input": "Say yes or no.\nquestion 0?", "targets": ["no"], "choices": ["no", "yes"], "answer": 0}
    assert [r["answer"] for r in records] == [0, 1, 0, 1, 0, 1]
    # nine distinct answers: generative, no choices
    many = oe.convert_samples([_sample("s", f"q{i}", f"a{i}") for i in range(9)])
    assert all(r["choices"] == [] and r["answer"] is None for r in many)
    # several ideal answers for one sample: not a single-choice task
    multi = oe.convert_samples([_sample("s", "q1", ["x", "y"]), _sample("s", "q2", "x")])
    assert multi[0]["targets"] == ["x", "y"] and all(r["answer"] is None for r in multi)
    # a plain-string input, and an input over the length cap (dropped)
    plain = oe.convert_samples([json.dumps({"input": "hello there", "ideal": "A"}),
                                json.dumps({"input": "x" * (oe.MAX_INPUT_CHARS + 1), "ideal": "B"})])
    assert [r["input"] for r in plain] == ["hello there"]


def test_extract_validates_names_and_keeps_only_registry_data(tmp_path):
    wheel = tmp_path / "evals.whl"
    ok = [_sample("Pick.", f"item {i}", "A" if i % 3 else "B") for i in range(5)]
    _wheel(wheel, {
        D + "alpha/samples.jsonl": ok,
        D + "beta/sub/test.v0.jsonl": ok,
        D + "gamma/bad__name.jsonl": ok,      # "__" would collide with the subtask separator
        D + "../escape.jsonl": ok,            # climbs out: never written
        "evals/registry/evals/alpha.yaml": ["not data"],
        D + "empty/samples.jsonl": [""],
    })
    out = tmp_path / "out"
    summary = oe.extract_evals(wheel, out)
    assert summary == {"alpha/samples": {"examples": 5, "multiple_choice": 1},
                       "beta/sub/test.v0": {"examples": 5, "multiple_choice": 1}}
    assert sorted(p.name for p in out.iterdir()) == ["alpha__samples.jsonl", "beta__sub__test.v0.jsonl"]
    assert task_store.task_names(out) == ["alpha/samples", "beta/sub/test.v0"]
    assert not (tmp_path / "escape.jsonl").exists()
    records = list(task_store.iter_task(out, "beta/sub/test.v0"))
    assert records[0]["choices"] == ["A", "B"] and records[0]["answer"] == 1
    with pytest.raises(KeyError, match="no task 'alpha/other'.*alpha/samples"):
        list(task_store.iter_task(out, "alpha/other"))
    with pytest.raises(ValueError, match="bad task name"):
        task_store.task_file(out, "../x")


def test_ensure_evals_from_a_copied_wheel_and_sarcasm_loader(tmp_path):
    wheel = tmp_path / "evals.whl"
    heads = [_sample("Respond with only a 1 or 0 to signify sarcasm", f"headline number {i}", str(i % 2)) for i in range(10)]
    mc = [_sample("Choose.", f"which is bigger, {i} or {i + 1}?", "second") for i in range(3)]
    mc.append(_sample("Choose.", "which is smaller, 1 or 2?", "first"))
    _wheel(wheel, {D + "sarcasm/samples.jsonl": heads, D + "crepe/samples.jsonl": mc,
                   D + "story/samples.jsonl": [_sample("Tell a story.", "about the sea and the sky", "once upon a time")]})
    folder = oe.ensure_evals(root=tmp_path, wheel=wheel)
    assert (folder / ".complete").read_text().startswith(oe.EVALS_REQUIREMENT)
    assert json.loads((folder / "index.json").read_text())["sarcasm/samples"]["examples"] == 10
    assert oe.ensure_evals(root=tmp_path) == folder  # cached: the wheel is not needed any more
    ds = oe.load_sarcasm(root=tmp_path)
    assert len(ds) == 10 and ds[0].text == "headline number 0" and ds[0].label == "not sarcastic"
    assert ds.label_counts() == {"not sarcastic": 5, "sarcastic": 5}
    ex = oe.load_mc_examples(("crepe/samples",), root=tmp_path)
    assert [e.choices for e in ex] == [("first", "second")] * 4 and [e.answer for e in ex] == [1, 1, 1, 0]
    # evaluation folders (sarcasm, crepe) are never pretraining text
    assert [n for n, _ in oe.pretraining_records(root=tmp_path)] == ["story/samples"]


def test_offline_wheel_fetch_error_is_clear(tmp_path, offline_pip):
    with pytest.raises(DataUnavailableError, match="pip download --no-deps --only-binary :all: evals==3.0.1.post1"):
        oe.fetch_evals_wheel(root=tmp_path)
    assert not any((tmp_path / "downloads").glob("*.whl"))  # nothing half-written left behind


# -- real data (the evals wheel from PyPI) ----------------------------------------------------------

@pytest.fixture(scope="module")
def evals_dir():
    """The converted cache; fetches the wheel (46 MB) and converts it (~15 s) when missing.

    Offline developers get a skip; CI (CI=true) must fetch and run it.
    """
    folder = oe.evals_cached()
    if folder is not None:
        return folder
    try:
        return oe.ensure_evals()
    except DataUnavailableError as exc:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"openai-evals not cached and cannot be fetched here: {exc}")


def test_real_tasks_counts_and_choices(evals_dir):
    names = oe.evals_task_names()
    assert len(names) == 563 and set(oe.MC_TASKS) <= set(names)
    usable = collections.Counter(e.task for e in oe.load_mc_examples(max_per_task=10**9))
    assert usable == {"quartz/samples": 3844, "theory_of_mind/socialiqa/test": 2203,
                      "abstract-causal-reasoning/symbolic_samples": 1981,
                      "syllables_long_words/long_word_samples": 1552, "crepe/samples": 1520}
    crepe = oe.load_evals_task("crepe/samples")
    assert crepe[0]["choices"] == ["equally likely", "less likely", "more likely"]
    assert oe.label_counts(crepe) == {"equally likely": 1176, "more likely": 230, "less likely": 114}
    t0 = time.perf_counter()
    assert oe.ensure_evals() == evals_dir
    assert time.perf_counter() - t0 < 1.0


def test_real_sarcasm_data(evals_dir):
    ds = load_dataset("sarcasm")
    assert ds.name == "sarcasm" and len(ds) == 28614
    assert ds.label_counts() == {"not sarcastic": 14984, "sarcastic": 13630}
    assert all(e.text and "\n" not in e.text and "Respond with" not in e.text for e in ds)


@pytest.fixture(scope="module")
def corpus(evals_dir) -> list[tuple[str, str]]:
    return oe.pretraining_records()


def test_pretraining_corpus_rules(corpus):
    chars = collections.Counter()
    for name, text in corpus:
        chars[name] += len(text)
    assert 4_000_000 < sum(chars.values()) < 8_000_000 and len(chars) > 200
    assert max(chars.values()) <= 40_000  # per-task budget
    folders = {n.split("/")[0] for n in chars}
    assert not folders & set(oe.NON_LANGUAGE_FOLDERS)
    assert not any(w in f.lower() for f in folders for w in ("spanish", "french", "russian", "korean"))
    for _, text in corpus:
        assert len(text) >= 20 and sum(c.isascii() for c in text) >= 0.95 * len(text)
    assert [n for n, _ in corpus] == sorted(n for n, _ in corpus)  # deterministic, by task name
    assert oe.pretraining_texts() == [t for _, t in corpus]
    # exclusion is per folder; a bare string is one name
    fewer = {n for n, _ in oe.pretraining_records(exclude="product-matching/zeroshot/samples", max_chars_per_task=2000)}
    assert not any(n.startswith("product-matching/") for n in fewer) and fewer
    assert any(n.startswith("product-matching/") for n, _ in corpus)


def test_pretraining_corpus_is_disjoint_from_evaluation(corpus):
    """No input of any evaluation task (every example, not only the sampled ones) is a pretraining
    text or, when >= 30 characters, a substring of the corpus; the headlines are checked alone
    (their instruction is shared with nothing else)."""
    assert not {n.split("/")[0] for n, _ in corpus} & oe.evaluation_folders()
    inputs = [r["input"].strip() for task in oe.MC_TASKS for r in oe.load_evals_task(task)]
    inputs += [e.text for e in oe.load_sarcasm()]
    leaks, n_long = corpus_leaks([t for _, t in corpus], inputs)
    assert len(inputs) > 35_000 and n_long > 30_000
    assert leaks == []


def test_the_bench_instruction_tasks_are_outside_the_shared_pretraining_corpus(corpus):
    """Every instruction setting of benchmarks/tta.toml runs on the one cached `deepseek-base`
    pretrained without any ``exclude``: its tasks' folders must be out of that corpus by rule
    (evaluation, non-language or foreign-language folders), and their inputs must not leak in."""
    import tomllib
    from pathlib import Path

    bench = tomllib.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "tta.toml").read_text())
    tasks = [t for s in bench["settings"] if s["config"]["dataset"]["name"] == "openai-evals"
             for t in s["config"]["dataset"]["tasks"]]
    assert len(tasks) >= 5
    folders = {n.split("/")[0] for n, _ in corpus}
    assert not folders & {task_store.folder_of(t) for t in tasks}
    inputs = [r["input"].strip() for t in tasks for r in oe.load_evals_task(t)[:2000]]
    leaks, n_long = corpus_leaks([t for _, t in corpus], inputs)
    assert n_long > 3_000 and leaks == []
