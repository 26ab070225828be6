"""A user's own data (``dataset.path``): rows of named columns from a file or a directory.

Formats, by what the path is:

* a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (a ``DatasetDict`` gives the split named by ``split``; needs ``datasets``),
* ``.arrow`` (Arrow IPC, stream or file format, e.g. one shard of a saved dataset) and
  ``.parquet`` (need ``pyarrow``),
* ``.jsonl`` / ``.ndjson`` (one JSON object per line) and ``.json`` (a list of objects),
* ``.csv`` / ``.tsv`` (a header row; every value is a string).

JSON lines and CSV need nothing beyond the standard library; ``datasets`` and ``pyarrow`` are the
optional ``data`` extra (``pip install "flux-moe[data]"``), imported only for the formats that
need them, with an error that says what to install when they are missing.

:func:`classification_examples` and :func:`generative_pairs` turn rows into the task's records;
every problem (a missing column, an empty value) is a :class:`TableError` naming the column and
the row.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from flux.data.sources import DataUnavailableError, Dataset, Example

DATA_EXTRA = 'pip install "flux-moe[data]"'  # pyproject.toml [project.optional-dependencies] data
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
ARROW_SUFFIXES = (".arrow",)
PARQUET_SUFFIXES = (".parquet", ".pq")
SUFFIXES = JSON_SUFFIXES + CSV_SUFFIXES + ARROW_SUFFIXES + PARQUET_SUFFIXES


class TableError(ValueError):
    """A user's data file cannot be used as asked (missing column, empty value, bad format)."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One generative example: the model reads ``prompt`` and learns to answer ``response``."""

    prompt: str
    response: str
    domain: Optional[str] = None


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataUnavailableError(
            f"{what} needs the optional package {module.split('.')[0]!r}: run `{DATA_EXTRA}` "
            f"(or `python -m pip install -c requirements/constraints.txt datasets pyarrow`); "
            f"JSON lines and CSV files work without it") from exc


def load_rows(path: str | os.PathLike, split: str = "train") -> list[dict[str, Any]]:
    """The rows of ``path`` as dicts (column name -> value), in file order (see the module doc).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataUnavailableError: the format needs ``datasets``/``pyarrow`` and they are missing.
        TableError: an unsupported suffix, a ``DatasetDict`` without ``split``, malformed JSON.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {p}")
    if p.is_dir():
        return _load_saved_dataset(p, split)
    suffix = p.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _load_json(p)
    if suffix in CSV_SUFFIXES:
        with open(p, encoding="utf-8", newline="") as fh:
            return [dict(row) for row in csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")]
    if suffix in ARROW_SUFFIXES:
        return _load_arrow(p)
    if suffix in PARQUET_SUFFIXES:
        pq = _require("pyarrow.parquet", f"reading {p.name} (Parquet)")
        return pq.read_table(p).to_pylist()
    raise TableError(f"{p}: unsupported file type {p.suffix!r}: use a datasets save_to_disk directory or a "
                     f"{', '.join(SUFFIXES)} file")


def _load_json(p: Path) -> list[dict]:
    if p.suffix.lower() == ".json":
        with open(p, encoding="utf-8") as fh:
            try:
                rows = json.load(fh)
            except json.JSONDecodeError as exc:
                raise TableError(f"{p}: not valid JSON ({exc}); JSON lines files end in .jsonl") from None
        if not isinstance(rows, list):
            raise TableError(f"{p}: a .json file must hold a list of objects (one per example)")
        items = list(enumerate(rows, 1))
    else:
        items = []
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        items.append((n, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise TableError(f"{p}:{n}: not a JSON object ({exc})") from None
    for n, row in items:
        if not isinstance(row, dict):
            raise TableError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
    return [row for _, row in items]


def _load_arrow(p: Path) -> list[dict]:
    pa = _require("pyarrow", f"reading {p.name} (Arrow)")
    with pa.memory_map(str(p), "r") as source:
        try:
            table = pa.ipc.open_stream(source).read_all()  # what datasets writes
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


def _load_saved_dataset(p: Path, split: str) -> list[dict]:
    if not ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        raise TableError(f"{p}: a directory must be written by datasets' save_to_disk (no dataset_dict.json or "
                         "state.json in it)")
    datasets = _require("datasets", f"reading {p} (a datasets save_to_disk directory)")
    loaded = datasets.load_from_disk(str(p))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise TableError(f"{p}: the DatasetDict has no split {split!r} (splits: {', '.join(loaded)}); "
                             "set dataset.split")
        loaded = loaded[split]
    return loaded.to_list()


def columns_of(rows: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows[:100]:
        seen.update(dict.fromkeys(row))
    return list(seen)


def detect_task(rows: Sequence[dict], *, prompt_column: str, response_column: str, label_column: str,
                text_column: str, where: str = "data") -> str:
    """``"generative"`` when the prompt and response columns exist, else ``"classification"``
    when the text and label columns do; otherwise a :class:`TableError` listing the columns."""
    cols = set(columns_of(rows))
    if prompt_column in cols and response_column in cols:
        return "generative"
    if text_column in cols and label_column in cols:
        return "classification"
    raise TableError(f"{where}: cannot tell the task from its columns {sorted(cols)}: a classification dataset "
                     f"needs dataset.text_column ({text_column!r}) and dataset.label_column ({label_column!r}), a "
                     f"generative one dataset.prompt_column ({prompt_column!r}) and dataset.response_column "
                     f"({response_column!r}); or set dataset.task")


def _value(row: dict, column: str, n: int, where: str, *, required: bool = True) -> Optional[str]:
    if column not in row:
        if not required:
            return None
        raise TableError(f"{where}: row {n} has no column {column!r} (columns: {sorted(row)})")
    value = row[column]
    if value is None or (isinstance(value, str) and value == ""):
        if not required:
            return None
        raise TableError(f"{where}: row {n}: column {column!r} is empty")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # CSV-free formats may give 1.0 for a label 1
    return value if isinstance(value, str) else (json.dumps(value) if isinstance(value, (list, dict)) else str(value))


def classification_examples(rows: Sequence[dict], *, text_column: str, label_column: str,
                            domain_column: str = "", where: str = "data") -> Dataset:
    """Rows -> a :class:`flux.data.Dataset` of ``Example(text, label, domain)`` (labels as strings;
    a row without a domain value gets the domain None)."""
    if not rows:
        raise TableError(f"{where}: no rows")
    examples = [Example(_value(row, text_column, n, where), label=_value(row, label_column, n, where),
                        domain=_value(row, domain_column, n, where, required=False) if domain_column else None)
                for n, row in enumerate(rows, 1)]
    return Dataset(examples, Path(where).stem or "data")


def generative_pairs(rows: Sequence[dict], *, prompt_column: str, response_column: str,
                     domain_column: str = "", where: str = "data") -> list[Pair]:
    """Rows -> :class:`Pair` records."""
    if not rows:
        raise TableError(f"{where}: no rows")
    return [Pair(_value(row, prompt_column, n, where), _value(row, response_column, n, where),
                 _value(row, domain_column, n, where, required=False) if domain_column else None)
            for n, row in enumerate(rows, 1)]


def sorted_labels(labels) -> list[str]:
    """Distinct labels, numerically ordered when they are all integers ("2" before "10")."""
    names = set(labels)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)
