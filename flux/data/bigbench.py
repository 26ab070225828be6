"""BIG-bench JSON tasks from the ``bigbench==1.0.0`` sdist: evaluation tasks and a pretraining corpus.

The sdist (fetched with pip into the cache by :func:`flux.data.sources.fetch_bigbench_sdist`) holds
``<root>/bigbench/benchmark_tasks/<task>/task.json`` and ``.../<task>/<subtask>/task.json`` files.
Its files carry a canary asking not to be put into training corpora, so nothing of it is ever
committed: :func:`ensure_bigbench` extracts it at run time, in one streaming pass, into compact
JSON-lines files in the user's cache (``<cache>/bigbench/<task>.jsonl`` or
``<task>__<subtask>.jsonl``), one record per example::

    {"input": str, "targets": [str, ...], "choices": [str, ...], "answer": int | null}

On top of that:

* :data:`MC_TASKS` -- the 8 multiple-choice evaluation (fine-tuning) tasks, one per participant
  group; :func:`load_mc_examples` / :func:`split_mc` turn them into :class:`MCExample` lists.
* :func:`pretraining_records` / :func:`pretraining_texts` -- English text from every other task,
  with evaluation tasks excluded **by folder** (sibling subtasks share templates) and
  :data:`NON_LANGUAGE_TASKS` (pixels, board games, bracket strings, non-English text) always left out.

MultiEmo has its own loader (:func:`flux.data.sources.load_multiemo`) and is not extracted here.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

from flux.data import task_store
from flux.data.sources import (
    BIGBENCH_REQUIREMENT,
    _safe_relpath,
    fetch_bigbench_sdist,
)
from flux.data.task_store import MCExample, split_mc  # noqa: F401  (part of this module's API)

# Examples kept per (sub)task: the first ones in file order, so the cache is deterministic and a few
# huge generated tasks (intersect_geometry: 250k examples, 355 MB) stay small on disk.
MAX_EXAMPLES_PER_TASK = 5000

# Folders never extracted: MultiEmo is 615 MB of mostly non-English reviews with its own loader.
SKIPPED_FOLDERS = ("multiemo",)

MC_TASKS: tuple[str, ...] = (
    "hyperbaton",
    "unit_conversion/si_conversion",
    "unit_conversion/unit_identification",
    "arithmetic/2_digit_addition",
    "cs_algorithms/valid_parentheses",
    "goal_step_wikihow/step_inference",
    "strategyqa",
    "elementary_math_qa/mathematical_hint_only",
)
"""Evaluation (fine-tuning) tasks: short English multiple-choice tasks with >= 1,000 examples each."""

# What is never used for pretraining because it is not (English) natural language: task folder
# names (all their subtasks), plus a few "task/subtask" names inside otherwise-English folders.
# The >= 95% ASCII filter of pretraining_records already drops non-Latin scripts (Hindi, Kannada,
# Persian, Russian, emoji, IPA ...); this list is for what that filter would let through.  Chosen by
# reading samples of every task with few English function words.
NON_LANGUAGE_TASKS: tuple[str, ...] = (
    # Encoded images, geometry and board games: ASCII, but not language.
    "ascii_word_recognition",    # ASCII-art words
    "checkmate_in_one",          # PGN move lists
    "chess_state_tracking",      # chess moves in algebraic notation
    "cifar10_classification",    # images as base64 / hex strings
    "geometric_shapes",          # SVG path coordinates
    "intersect_geometry",        # coordinates of lines and circles
    "kanji_ascii",               # kanji drawn as '#'/'.' grids
    "mnist_ascii",               # digits drawn as ASCII grids
    # Symbol strings: brackets, letter/number sequences, formulas, data records, codes.
    "cs_algorithms",             # bracket sequences and random letter strings
    "dyck_languages",            # bracket sequences
    "language_games",            # Pig Latin / "egg" language encodings
    "list_functions",            # [3, 4, 1] -> [1] (261 subtasks)
    "modified_arithmetic",       # "102 + 435 -> 537" lines
    "mult_data_wrangling",       # dates, phone numbers, e-mail addresses (246 subtasks)
    "simp_turing_concept",       # binary strings and a toy programming language
    "unnatural_in_context_learning",  # random symbol/number sequences
    # Non-English text that survives an ASCII filter (Latin script or romanised).
    "common_morpheme",           # English mixed with French
    "conlang_translation",       # invented languages
    "cryobiology_spanish",       # Spanish
    "gender_inclusive_sentences_german",  # German
    "hindi_question_answering",  # Hindi (non-ASCII too)
    "hinglish_toxicity",         # romanised Hindi
    "language_identification",   # sentences in ~1,000 languages
    "linguistics_puzzles",       # Rosetta-stone puzzles in foreign languages
    "multiemo",                  # Polish and 10 other languages (never extracted anyway)
    "paragraph_segmentation",    # multilingual Wikipedia; targets are 0/1 label strings
    "polish_sequence_labeling",  # Polish (~94% ASCII: much of it would pass the filter)
    "salient_translation_error_detection",  # German source sentences
    "swahili_english_proverbs",  # Swahili inputs
    "swedish_to_german_proverbs",  # Swedish and German
    "which_wiki_edit",           # wiki diffs in many languages
    "gem/cs_restaurants",        # Czech (the other gem subtasks are English)
    "gem/mlsum_de",              # German news
    "gem/mlsum_es",              # Spanish news
    "gem/webnlg_ru",             # Russian
    "gem/wikilingua_multilingual",  # many languages
    "linguistic_mappings/de_past_tense_irregular_json",  # German verb forms
    "linguistic_mappings/de_past_tense_json",
    "linguistic_mappings/de_past_tense_regular_json",
)

_TASK_MEMBER = re.compile(
    r"^[^/]+/bigbench/benchmark_tasks/(?P<task>[A-Za-z0-9_]+)/(?:(?P<sub>[A-Za-z0-9_]+)/)?task\.json$")


# --------------------------------------------------------------------------------------------------
# Extraction


def _normalise_example(item: object) -> dict | None:
    """One bigbench example as our compact record, or None when it has no usable input."""
    if not isinstance(item, dict):
        return None
    text = item.get("input")
    if not isinstance(text, str) or not text.strip():
        return None  # a few tasks put everything into the choices (cause_and_effect): no prompt
    choices: list[str] = []
    answer = None
    scores = item.get("target_scores")
    if isinstance(scores, dict) and scores:
        choices = [str(c) for c in scores]  # JSON object order = the file's choice order
        values = []
        for value in scores.values():
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                values.append(float("nan"))
        best = max((v for v in values if not math.isnan(v)), default=float("nan"))
        # A unique positive maximum is a single correct choice; ties or all-zero scores are not.
        if best > 0 and values.count(best) == 1:
            answer = values.index(best)
    target = item.get("target")
    if isinstance(target, str):
        targets = [target]
    elif isinstance(target, list):
        targets = [str(t) for t in target if t is not None]
    else:
        targets = [choices[answer]] if answer is not None else []
    return {"input": text, "targets": targets, "choices": choices, "answer": answer}


def extract_bigbench(
    sdist: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_examples: int = MAX_EXAMPLES_PER_TASK,
    progress: bool = False,
) -> dict[str, dict[str, int]]:
    """Convert every JSON (sub)task of the sdist to ``dest/<task>[__<subtask>].jsonl``.

    One streaming pass over the archive.  Member names are checked (no absolute paths, no ``..``),
    only regular files are read, and output names are built from the regex-validated task and
    subtask names, so nothing in the archive decides where bytes land.  Tasks without an
    ``"examples"`` list (folders whose task.json only lists subtasks) produce no file.

    Returns ``{name: {"examples": kept, "source_examples": in_file}}`` with ``name`` = ``"task"``
    or ``"task/subtask"``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, int]] = {}
    total = os.path.getsize(sdist)
    next_report = 0.1
    with open(sdist, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
        for member in tar:  # streaming: members are read in archive order, never seeked back to
            if progress and raw.tell() >= next_report * total:
                print(f"bigbench: {100 * raw.tell() / total:3.0f}% of {Path(sdist).name} read, "
                      f"{len(summary)} tasks so far", file=sys.stderr, flush=True)
                while next_report * total <= raw.tell():
                    next_report += 0.1
            if "/benchmark_tasks/" not in member.name or not member.name.endswith("task.json"):
                continue  # never extracted, so its name does not matter
            name = _safe_relpath(member.name)
            match = _TASK_MEMBER.match(name)
            if match is None or not member.isfile() or match.group("task") in SKIPPED_FOLDERS:
                continue
            task, sub = match.group("task"), match.group("sub")
            src = tar.extractfile(member)
            assert src is not None  # regular file
            with src:
                doc = json.loads(src.read())
            examples = doc.get("examples") if isinstance(doc, dict) else None
            if not isinstance(examples, list):
                continue
            records = []
            for item in examples:
                record = _normalise_example(item)
                if record is not None:
                    records.append(record)
                    if len(records) >= max_examples:
                        break
            if not records:
                continue
            name = task if sub is None else f"{task}/{sub}"  # bigbench names have no "__" (checked)
            task_store.write_task(dest, name, records)
            summary[name] = {
                "examples": len(records), "source_examples": len(examples)}
    if progress:
        print(f"bigbench: done, {len(summary)} tasks", file=sys.stderr, flush=True)
    return dict(sorted(summary.items()))


def ensure_bigbench(
    root: str | os.PathLike | None = None,
    sdist: str | os.PathLike | None = None,
    *,
    progress: bool = False,
) -> Path:
    """The folder of extracted BIG-bench tasks (``<cache>/bigbench``), extracting them if needed.

    Idempotent and safe to call from several processes: the folder appears atomically (renamed
    from a temporary one, with a ``.complete`` marker and an ``index.json`` of example counts)
    under a lock.  ``sdist`` lets an offline machine use a copied ``bigbench-1.0.0.tar.gz``;
    otherwise it is fetched with pip (~358 MB) when missing.  ``progress`` prints a line to stderr
    per ~10% of the archive read.  Takes ~45 s (one core; decompressing 358 MB and parsing ~1.1 GB
    of JSON) and ~420 MB of disk.
    """
    return task_store.build_task_folder(
        "bigbench", sdist, lambda: fetch_bigbench_sdist(root=root),
        lambda archive, tmp: extract_bigbench(archive, tmp, progress=progress), marker=BIGBENCH_REQUIREMENT, root=root)


def bigbench_cached(root: str | os.PathLike | None = None) -> Path | None:
    """The extracted folder if it is already complete in the cache, else None (never extracts)."""
    return task_store.cached_task_folder("bigbench", root=root)


def bigbench_task_names(root: str | os.PathLike | None = None) -> list[str]:
    """Sorted names of the extracted (sub)tasks: ``"task"`` or ``"task/subtask"``.  Extracts if needed."""
    return task_store.task_names(ensure_bigbench(root=root))


def load_bigbench_task(name: str, root: str | os.PathLike | None = None) -> list[dict]:
    """The records of one (sub)task, in file order (at most 5,000, empty inputs dropped).

    Each record is ``{"input": str, "targets": list[str], "choices": list[str], "answer": int | None}``:
    ``choices`` are the ``target_scores`` keys in file order (empty for generative tasks),
    ``answer`` the index of the unique positive top score (else None), ``targets`` the task's
    ``target`` as a list, or ``[choices[answer]]`` when it has none.
    """
    return list(task_store.iter_task(ensure_bigbench(root=root), name))


def load_mc_examples(
    tasks: Sequence[str] = MC_TASKS,
    *,
    max_per_task: int = 1000,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> list[MCExample]:
    """Multiple-choice examples of BIG-bench ``tasks``: at most ``max_per_task`` per task, seeded
    (rules: :func:`flux.data.task_store.sample_mc_examples`).
    Returns a ``list[MCExample]`` of length ``sum(min(max_per_task, usable(task)))``.
    """
    return task_store.sample_mc_examples(ensure_bigbench(root=root), tasks, max_per_task=max_per_task, seed=seed)


def pretraining_records(
    exclude: Iterable[str] = (),
    *,
    max_chars_per_task: int = 40_000,
    root: str | os.PathLike | None = None,
) -> list[tuple[str, str]]:
    """``(task name, text)`` pairs for pretraining, sorted by task name, then file order.

    ``text`` is ``input + " " + first target`` (just the input when the example has no target).
    Left out: every (sub)task whose **folder** is named in ``exclude`` -- excluding
    ``"unit_conversion/si_conversion"`` excludes all of ``unit_conversion/*``, because sibling
    subtasks share templates and answers -- and :data:`NON_LANGUAGE_TASKS`.  So
    ``exclude=MC_TASKS`` keeps the corpus disjoint from the evaluation folders.  Kept: records of
    >= 20 characters with >= 95% ASCII, taken per (sub)task in file order until the next one would
    take the task past ``max_chars_per_task`` characters.
    """
    if isinstance(exclude, str):  # a bare name would otherwise be split into characters
        exclude = (exclude,)
    return task_store.text_records(
        ensure_bigbench(root=root),
        banned_folders={task_store.folder_of(n) for n in exclude} | {n for n in NON_LANGUAGE_TASKS if "/" not in n},
        banned_names={n for n in NON_LANGUAGE_TASKS if "/" in n},
        max_chars_per_task=max_chars_per_task)


def pretraining_texts(
    exclude: Iterable[str] = (),
    *,
    max_chars_per_task: int = 40_000,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """The texts of :func:`pretraining_records` (same rules, same deterministic order): ``list[str]``.

    Folder-level exclusion: ``exclude=MC_TASKS`` drops every subtask of the evaluation tasks'
    folders (e.g. all of ``unit_conversion``), not only the evaluated subtasks.
    """
    return [text for _, text in pretraining_records(exclude, max_chars_per_task=max_chars_per_task, root=root)]
