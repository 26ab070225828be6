"""Tasks of the OpenAI ``evals`` registry, from the ``evals`` wheel on PyPI: the default data.

The wheel (``evals==3.0.1.post1``, 46 MB, fetched with pip into the cache by
:func:`fetch_evals_wheel`; nothing of it is installed or committed) ships
``evals/registry/data/<task>/.../<file>.jsonl`` files of community-written evaluations, one
chat-format sample per line: ``{"input": [{"role": ..., "content": ...}, ...], "ideal": str | [str]}``.
:func:`ensure_evals` converts every file once, in one pass, into the compact records of
:mod:`flux.data.task_store` in ``<cache>/openai-evals``; a file is one task, named by its path
without ``.jsonl`` (``"sarcasm/samples"``, ``"theory_of_mind/socialiqa/test"``).

* ``input`` is the messages' contents joined by newlines, ``targets`` the ideal answer(s).
* A file whose samples each have one ideal answer, with 2..8 distinct answers in the file, is a
  multiple-choice task in the lm-evaluation-harness sense: ``choices`` are the file's distinct
  answers (sorted) and ``answer`` indexes the sample's own.  Other files have no choices.

On top of that:

* :data:`MC_TASKS` -- the 5 multiple-choice fine-tuning tasks (one per participant group) and
  :func:`load_mc_examples`; :data:`CLASSIFICATION_TASK` -- ``sarcasm/samples`` (news headlines,
  sarcastic or not) and :func:`load_sarcasm`, the classification setting's data.
* :func:`pretraining_records` / :func:`pretraining_texts` -- English text of every other task,
  with the evaluation tasks excluded **by folder** and :data:`NON_LANGUAGE_FOLDERS` (grids,
  boards, ciphers, tables, foreign languages) always left out.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

from flux.data import task_store
from flux.data.sources import Dataset, DataUnavailableError, Example, fetch_with_pip
from flux.data.task_store import MCExample, split_mc  # noqa: F401  (part of this module's API)

EVALS_REQUIREMENT = "evals==3.0.1.post1"
EVALS_WHEEL = "evals-3.0.1.post1-py3-none-any.whl"
_DATA_PREFIX = "evals/registry/data/"

# Per task: the first examples in file order (deterministic); longer inputs are dropped, so a few
# huge generated files (maze grids, Raven matrices as text) stay small on disk.
MAX_EXAMPLES_PER_TASK = 30_000
MAX_INPUT_CHARS = 4_000

MC_TASKS: tuple[str, ...] = (
    "abstract-causal-reasoning/symbolic_samples",
    "crepe/samples",
    "quartz/samples",
    "syllables_long_words/long_word_samples",
    "theory_of_mind/socialiqa/test",
)
"""Fine-tuning tasks: short English multiple-choice tasks with 1,500-3,900 examples each."""

CLASSIFICATION_TASK = "sarcasm/samples"
SARCASM_LABELS = {"0": "not sarcastic", "1": "sarcastic"}

# Folders never used for pretraining because they are not English language: chosen by reading
# samples of every folder whose text passes the >= 95% ASCII filter of task_store.text_records.
NON_LANGUAGE_FOLDERS: tuple[str, ...] = (
    # grids, boards, puzzles and drawings as symbols
    "2d_movement", "3d_globe_movement", "GOL", "arc", "ascii-digit-recognition", "ascii_wordart",
    "backgammon", "chess", "chess_piece_count", "connect4", "cube-pack", "dice-rotation-sequence",
    "mate-in-one", "mazes", "raven-matrices", "rubiks-colors", "simple-block-puzzles", "tetris",
    "svg_alphabet", "svg_to_text", "svg_understanding", "find_country_from_svg", "wkt_understanding",
    # ciphers, encodings and symbol strings
    "base64_decode", "bitwise", "decrypt_caesar_cipher", "rot13", "vigenere", "steganography",
    "naughty_strings", "text_compression", "complex_replace_characters", "reverse_string",
    "count_token_freq_dna", "smiles_to_formula", "positive-binary-operations", "pointer-value-retrieval",
    "formal_logic", "schelling_point", "json_patch_object", "unified_patch",
    # tables and numbers
    "diabetes", "heart-disease", "osm_mapping", "determinant", "matrix_mult_rows", "mapping_to_matricies",
    "linear-regression", "integer-sequence-predictions", "sort_numeric", "poker_hand_ranks",
    "benjaminmoore_to_hex", "pantone_to_hex", "ral_to_hex", "convert-hex-hsl-lightness",
)
# Folders in languages other than English (a Latin script passes the ASCII filter)
_FOREIGN = ("afrikaans", "albanian", "arabic", "belarusian", "blackfoot", "brazilian", "bulgarian",
            "canto", "chinese", "croatian", "dutch", "finnish", "french", "german", "greek", "gujarati",
            "hebrew", "hindi", "hungarian", "icelandic", "indonesian", "irish", "italian", "japanese",
            "kanji", "korean", "latin", "lithuanian", "macedonian", "mongolian", "nepali", "norwegian",
            "persian", "polish", "portuguese", "romanian", "rucola", "russe", "russian", "serbian",
            "sindarin", "spanish", "swedish", "turkish", "ukraine", "urdu", "vietnamese")


def _is_foreign(folder: str) -> bool:
    low = folder.lower()
    return any(word in low for word in _FOREIGN)


def fetch_evals_wheel(root: str | os.PathLike | None = None, timeout: float = 1200.0) -> Path:
    """The ``evals`` wheel (46 MB) in ``<cache>/downloads``, downloaded with pip once (no deps,
    nothing installed)."""
    return fetch_with_pip(EVALS_REQUIREMENT, EVALS_WHEEL, sdist=False, what="the OpenAI evals task data",
                          root=root, timeout=timeout)


def _prompt(sample_input: object) -> str | None:
    """The text of a sample's ``input``: a string, or the contents of its chat messages."""
    if isinstance(sample_input, str):
        return sample_input
    if isinstance(sample_input, list):
        parts = [str(m.get("content", "")).strip() for m in sample_input if isinstance(m, dict)]
        return "\n".join(p for p in parts if p)
    return None


def _targets(ideal: object) -> list[str]:
    if isinstance(ideal, str):
        return [ideal]
    if isinstance(ideal, list):
        return [str(t) for t in ideal if t is not None]
    return [] if ideal is None else [str(ideal)]


def convert_samples(lines: Iterable[str]) -> list[dict]:
    """One evals JSON-lines file as :mod:`flux.data.task_store` records (rules in the module docstring).

    Lines that are not JSON objects with a usable ``input`` are skipped (a few files hold few-shot
    ``{"sample": ...}`` records or templates); at most :data:`MAX_EXAMPLES_PER_TASK` records.
    """
    records = []
    for line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(item, dict):
            continue
        text = _prompt(item.get("input"))
        if not text or not text.strip() or len(text) > MAX_INPUT_CHARS:
            continue
        records.append({"input": text, "targets": _targets(item.get("ideal")), "choices": [], "answer": None})
        if len(records) >= MAX_EXAMPLES_PER_TASK:
            break
    singles = [r["targets"][0].strip() for r in records if len(r["targets"]) == 1]
    answers = sorted(set(singles))
    if records and len(singles) == len(records) and 2 <= len(answers) <= 8 and "" not in answers:
        index = {a: i for i, a in enumerate(answers)}
        for r in records:
            r["choices"], r["answer"] = list(answers), index[r["targets"][0].strip()]
    return records


def extract_evals(wheel: str | os.PathLike, dest: str | os.PathLike, *, progress: bool = False) -> dict[str, dict[str, int]]:
    """Convert every ``evals/registry/data/**.jsonl`` of the wheel to ``dest/<task>.jsonl``.

    Member names are validated (:func:`flux.data.task_store.valid_task_name`: no absolute paths,
    no ``..``), and output names are built from them, so nothing in the archive decides where bytes
    land.  Returns ``{task: {"examples": kept, "multiple_choice": 0 | 1}}``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, int]] = {}
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist()
                   if m.filename.startswith(_DATA_PREFIX) and m.filename.endswith(".jsonl") and not m.is_dir()]
        for i, member in enumerate(members):
            name = member.filename[len(_DATA_PREFIX):-len(".jsonl")]
            if not task_store.valid_task_name(name):
                continue
            with archive.open(member) as fh:
                lines = (raw.decode("utf-8", "replace") for raw in fh)
                records = convert_samples(lines)
            if records:
                task_store.write_task(dest, name, records)
                summary[name] = {"examples": len(records), "multiple_choice": int(records[0]["answer"] is not None)}
            if progress and (i + 1) % 100 == 0:
                print(f"openai-evals: {i + 1}/{len(members)} files converted", file=sys.stderr, flush=True)
    if progress:
        print(f"openai-evals: done, {len(summary)} tasks", file=sys.stderr, flush=True)
    return dict(sorted(summary.items()))


def ensure_evals(root: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
                 *, progress: bool = False) -> Path:
    """The folder of converted evals tasks (``<cache>/openai-evals``), building it if needed.

    Idempotent and safe to call from several processes: the folder appears atomically (renamed from
    a temporary one, with a ``.complete`` marker and an ``index.json``) under a lock.  ``wheel``
    lets an offline machine use a copied ``evals-3.0.1.post1-py3-none-any.whl``; otherwise it is
    fetched with pip when missing.  Takes ~15 s and ~300 MB of disk.
    """
    return task_store.build_task_folder(
        "openai-evals", wheel, lambda: fetch_evals_wheel(root=root),
        lambda archive, tmp: extract_evals(archive, tmp, progress=progress), marker=EVALS_REQUIREMENT, root=root)


def evals_cached(root: str | os.PathLike | None = None) -> Path | None:
    """The converted folder if it is already complete in the cache, else None (never fetches)."""
    return task_store.cached_task_folder("openai-evals", root=root)


def evals_task_names(root: str | os.PathLike | None = None) -> list[str]:
    """Sorted names of the converted tasks.  Fetches and converts if needed."""
    return task_store.task_names(ensure_evals(root=root))


def load_evals_task(name: str, root: str | os.PathLike | None = None) -> list[dict]:
    """The :mod:`flux.data.task_store` records of one task, in file order."""
    return list(task_store.iter_task(ensure_evals(root=root), name))


def load_mc_examples(
    tasks: Sequence[str] = MC_TASKS,
    *,
    max_per_task: int = 1000,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> list[MCExample]:
    """Multiple-choice examples of evals ``tasks``: at most ``max_per_task`` per task, seeded
    (rules: :func:`flux.data.task_store.sample_mc_examples`)."""
    return task_store.sample_mc_examples(ensure_evals(root=root), tasks, max_per_task=max_per_task, seed=seed)


def load_sarcasm(root: str | os.PathLike | None = None) -> Dataset:
    """News headlines labelled sarcastic (The Onion) or not (HuffPost): the ``sarcasm`` eval.

    28,614 headlines, 47.6% sarcastic.  ``text`` is the headline alone (the eval's instruction
    is dropped: it is the same for every example), ``label`` ``"sarcastic"`` / ``"not sarcastic"``.
    There is no natural domain: partition it by label skew (``dirichlet``) or ``iid``.
    """
    examples = []
    for record in task_store.iter_task(ensure_evals(root=root), CLASSIFICATION_TASK):
        headline = record["input"].split("\n", 1)[-1].strip()  # after the system instruction
        label = SARCASM_LABELS.get(record["targets"][0].strip()) if record["targets"] else None
        if headline and label is not None:
            examples.append(Example(headline, label=label))
    if not examples:
        raise DataUnavailableError(f"no headlines in the {CLASSIFICATION_TASK} eval")
    return Dataset(examples, "sarcasm")


def evaluation_folders() -> set[str]:
    """Folders of every task this library evaluates on (never pretrained on)."""
    return {task_store.folder_of(n) for n in (*MC_TASKS, CLASSIFICATION_TASK)}


def pretraining_records(
    exclude: Iterable[str] = (),
    *,
    max_chars_per_task: int = 40_000,
    root: str | os.PathLike | None = None,
) -> list[tuple[str, str]]:
    """``(task name, text)`` pairs for pretraining (rules: :func:`flux.data.task_store.text_records`).

    Left out, by whole folder: the evaluation tasks (:data:`MC_TASKS`, :data:`CLASSIFICATION_TASK`),
    the folders of ``exclude``, :data:`NON_LANGUAGE_FOLDERS` and every folder in another language.
    """
    if isinstance(exclude, str):  # a bare name would otherwise be split into characters
        exclude = (exclude,)
    folder = ensure_evals(root=root)
    folders = {task_store.folder_of(n) for n in task_store.task_names(folder)}
    banned = (evaluation_folders() | {task_store.folder_of(n) for n in exclude} | set(NON_LANGUAGE_FOLDERS)
              | {f for f in folders if _is_foreign(f)})
    return task_store.text_records(folder, banned_folders=banned, max_chars_per_task=max_chars_per_task)


def pretraining_texts(
    exclude: Iterable[str] = (),
    *,
    max_chars_per_task: int = 40_000,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """The texts of :func:`pretraining_records` (same rules, same deterministic order): ``list[str]``."""
    return [text for _, text in pretraining_records(exclude, max_chars_per_task=max_chars_per_task, root=root)]


def label_counts(records: Sequence[dict]) -> dict[str, int]:
    """How often each answer is correct in ``records`` (multiple-choice tasks): ``{choice: count}``."""
    return dict(collections.Counter(r["choices"][r["answer"]] for r in records if r["answer"] is not None))
