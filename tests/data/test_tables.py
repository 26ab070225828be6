"""flux.data.tables: a user's data from every supported format, task detection, clear errors, and
the optional datasets/pyarrow imports."""
from __future__ import annotations

import builtins
import csv
import json

import pytest

from flux.data.sources import DataUnavailableError
from flux.data.tables import (
    DATA_EXTRA,
    Pair,
    TableError,
    classification_examples,
    detect_task,
    generative_pairs,
    load_rows,
    sorted_labels,
)

ROWS = [{"text": "good film", "label": "pos", "genre": "film"}, {"text": "bad book", "label": "neg", "genre": "book"},
        {"text": "fine song", "label": "pos", "genre": None}]
COLS = dict(prompt_column="prompt", response_column="response", label_column="label", text_column="text")


def test_jsonl_json_csv_tsv_without_optional_packages(tmp_path, monkeypatch):
    _block(monkeypatch, "datasets", "pyarrow")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    for name, delim in (("a.csv", ","), ("a.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["text", "label", "genre"], delimiter=delim)
            w.writeheader()
            w.writerows(ROWS)
    assert load_rows(tmp_path / "a.jsonl") == ROWS
    assert load_rows(tmp_path / "a.json") == ROWS
    for name in ("a.csv", "a.tsv"):
        rows = load_rows(tmp_path / name)
        assert [r["text"] for r in rows] == [r["text"] for r in ROWS] and rows[2]["genre"] == ""


def test_parquet_arrow_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, str(tmp_path / "a.parquet"))
    assert load_rows(tmp_path / "a.parquet") == ROWS
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink:  # Arrow IPC file format
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    assert load_rows(tmp_path / "file.arrow") == ROWS
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_rows(tmp_path / "ds") == ROWS
    shard = next((tmp_path / "ds").glob("*.arrow"))  # one shard of a saved dataset (IPC stream format)
    assert load_rows(shard) == ROWS
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(tmp_path / "dd") == ROWS
    assert load_rows(tmp_path / "dd", split="test") == ROWS[:1]
    with pytest.raises(TableError, match="no split 'validation'.*train, test"):
        load_rows(tmp_path / "dd", split="validation")


def _block(monkeypatch, *names):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.split(".")[0] in names:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    import importlib

    real_import_module = importlib.import_module

    def fake_module(name, *args, **kwargs):
        if name.split(".")[0] in names:
            raise ImportError(f"No module named {name!r}")
        return real_import_module(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_module)


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    _block(monkeypatch, "datasets", "pyarrow")
    with pytest.raises(DataUnavailableError, match="pyarrow") as info:
        load_rows(tmp_path / "a.parquet")
    assert DATA_EXTRA in str(info.value) and "JSON lines and CSV" in str(info.value)
    with pytest.raises(DataUnavailableError, match="'datasets'"):
        load_rows(tmp_path / "ds")


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(TableError, match="unsupported file type"):
        load_rows(tmp_path / "a.xlsx")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TableError, match="save_to_disk"):
        load_rows(tmp_path / "empty_dir")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(TableError, match=r"b.jsonl:2"):
        load_rows(tmp_path / "b.jsonl")
    (tmp_path / "c.json").write_text('{"text": "x"}')
    with pytest.raises(TableError, match="list of objects"):
        load_rows(tmp_path / "c.json")


def test_task_detection():
    assert detect_task(ROWS, **COLS) == "classification"
    assert detect_task([{"prompt": "q", "response": "a", "label": "x", "text": "t"}], **COLS) == "generative"
    with pytest.raises(TableError, match=r"cannot tell the task.*\['body', 'y'\]"):
        detect_task([{"body": "x", "y": 1}], **COLS)


def test_rows_to_examples_and_pairs():
    data = classification_examples(ROWS, text_column="text", label_column="label", domain_column="genre")
    assert data.labels == ["pos", "neg", "pos"] and data.domains == ["film", "book", None]
    ints = classification_examples([{"t": "a", "y": 10}, {"t": "b", "y": 2.0}], text_column="t", label_column="y")
    assert ints.labels == ["10", "2"] and sorted_labels(ints.labels) == ["2", "10"]
    with pytest.raises(TableError, match="row 2 has no column 'label'"):
        classification_examples([{"text": "a", "label": "x"}, {"text": "b"}], text_column="text", label_column="label")
    with pytest.raises(TableError, match="row 1: column 'text' is empty"):
        classification_examples([{"text": "", "label": "x"}], text_column="text", label_column="label")
    pairs = generative_pairs([{"q": "2+2", "a": 4, "d": "math"}], prompt_column="q", response_column="a",
                             domain_column="d")
    assert pairs == [Pair("2+2", "4", "math")]
    with pytest.raises(TableError, match="no rows"):
        generative_pairs([], prompt_column="q", response_column="a")
