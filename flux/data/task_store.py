"""A folder of extracted evaluation tasks, one compact JSON-lines file per task.

Both task sources, :mod:`flux.data.bigbench` (the ``bigbench==1.0.0`` sdist) and
:mod:`flux.data.openai_evals` (the ``evals`` wheel), extract their archives into such a folder in
the user's cache; everything that reads tasks back works on the folder and is shared here.  A task
is named ``"task"`` or ``"task/sub[/...]"`` and stored as ``<task>__<sub>.jsonl``, one record per
example::

    {"input": str, "targets": [str, ...], "choices": [str, ...], "answer": int | null}

``choices`` are the candidate answers of a multiple-choice example (empty for generative ones) and
``answer`` the index of the correct one (null when there is no single correct choice).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from flux.data.cache import atomic_dir, cache_dir, file_lock
from flux.data.sources import DataUnavailableError

SUB_SEP = "__"  # "a/b" is stored as a__b.jsonl; extraction skips names that contain it
_COMPONENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"  # never "." or "..": no component can climb out
_NAME = re.compile(rf"{_COMPONENT}(/{_COMPONENT})*")


def cached_task_folder(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """``<cache>/<name>`` if a complete extraction is there, else None (never builds)."""
    folder = cache_dir(name, root=root, create=False)
    return folder if (folder / ".complete").is_file() else None


def build_task_folder(name: str, archive: str | os.PathLike | None, fetch: Callable[[], Path],
                      extract: Callable[[Path, Path], dict], *, marker: str,
                      root: str | os.PathLike | None = None) -> Path:
    """``<cache>/<name>``, filled by ``extract(archive, tmp_dir) -> {task: counts}`` when not
    complete yet; ``archive`` is a copied file, or None to call ``fetch()`` for it (only when the
    folder must be built, so a cached folder needs no download).

    Idempotent and safe to call from several processes: the folder appears atomically (renamed
    from a temporary one, with a ``.complete`` marker starting with ``marker`` and an
    ``index.json`` of what ``extract`` returned) under a lock.  An archive without tasks raises
    :class:`flux.data.sources.DataUnavailableError`.
    """
    done = cached_task_folder(name, root=root)
    if done is not None:
        return done
    folder = cache_dir(name, root=root, create=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f"{name}.lock"):
        done = cached_task_folder(name, root=root)
        if done is not None:  # another process finished it while we waited
            return done
        source = Path(archive) if archive is not None else fetch()
        with atomic_dir(folder) as tmp:
            summary = extract(source, tmp)
            if not summary:
                raise DataUnavailableError(f"{source} holds no {name} tasks")
            (tmp / "index.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
            (tmp / ".complete").write_text(f"{marker}\n{len(summary)} tasks\n")
    return folder


def valid_task_name(name: str) -> bool:
    """Whether ``name`` can name a task file (safe components, no ``__``)."""
    return bool(_NAME.fullmatch(name)) and SUB_SEP not in name


def task_file(folder: Path, name: str) -> Path:
    """The file of task ``name`` in ``folder``."""
    if not valid_task_name(name):
        raise ValueError(f"bad task name {name!r}: use 'task' or 'task/subtask' (letters, digits, _ . -)")
    return folder / f"{name.replace('/', SUB_SEP)}.jsonl"


def write_task(folder: Path, name: str, records: Sequence[dict]) -> None:
    """Write the records of task ``name`` (see the module docstring for their fields)."""
    with open(task_file(folder, name), "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def task_names(folder: Path) -> list[str]:
    """Sorted names of the tasks stored in ``folder``."""
    return sorted(p.stem.replace(SUB_SEP, "/") for p in folder.glob("*.jsonl"))


def folder_of(name: str) -> str:
    """The top-level folder of ``"task"`` or ``"task/sub"``: sibling subtasks share templates."""
    return name.split("/", 1)[0]


def iter_task(folder: Path, name: str) -> Iterator[dict]:
    """Records of one task read lazily, so a caller that stops early reads only a prefix."""
    path = task_file(folder, name)
    if not path.is_file():
        similar = [n for n in task_names(folder) if folder_of(n) == folder_of(name)]
        hint = f"; its folder has: {', '.join(similar[:10])}" if similar else ""
        raise KeyError(f"no task {name!r} in {folder}{hint}")
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


# --------------------------------------------------------------------------------------------------
# Multiple-choice evaluation tasks


@dataclasses.dataclass(frozen=True)
class MCExample:
    """One multiple-choice question: score ``" " + choice`` after ``prompt`` for each choice.

    ``answer`` indexes ``choices``; ``task`` is the task name, e.g. ``"strategyqa"``.
    """

    prompt: str
    choices: tuple[str, ...]
    answer: int
    task: str


def _mc_candidates(folder: Path, task: str) -> list[MCExample]:
    """All usable examples of one task, in file order, without repeated prompts."""
    out, seen = [], set()
    for record in iter_task(folder, task):
        choices, answer = record["choices"], record["answer"]
        if answer is None or not 2 <= len(choices) <= 8:
            continue
        stripped = tuple(c.strip() for c in choices)
        if "" in stripped or len(set(stripped)) != len(stripped):
            continue  # an empty or repeated choice cannot be scored as a distinct continuation
        prompt = f"{record['input'].strip()}\nAnswer:"
        # A prompt seen twice in one task would let a test question leak into the training split.
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(MCExample(prompt, stripped, int(answer), task))
    return out


def sample_mc_examples(folder: Path, tasks: Sequence[str], *, max_per_task: int, seed: int) -> list[MCExample]:
    """Multiple-choice examples of ``tasks`` in ``folder``: at most ``max_per_task`` per task, seeded.

    Kept: examples with a unique correct choice and 2..8 choices, the first occurrence of each
    prompt.  Prompt format: ``f"{input.strip()}\\nAnswer:"``; the caller scores each continuation
    ``" " + choice`` (choices are stripped of edge whitespace) and predicts the best one.  The
    subset of each task is drawn with ``random.Random(f"{seed}:{task}")`` (so adding a task does
    not change the others), and the result is sorted by task, then by original file position.
    """
    if max_per_task < 1:
        raise ValueError(f"max_per_task must be >= 1, got {max_per_task}")
    result: list[MCExample] = []
    for task in sorted(set(tasks)):
        pool = _mc_candidates(folder, task)
        if len(pool) > max_per_task:
            keep = sorted(random.Random(f"{seed}:{task}").sample(range(len(pool)), max_per_task))
            pool = [pool[i] for i in keep]
        result.extend(pool)
    return result


def split_mc(
    examples: Sequence[MCExample], test_per_task: int, seed: int = 0
) -> tuple[list[MCExample], list[MCExample]]:
    """Per task, a seeded held-out test set of ``test_per_task`` examples; the rest is train.

    Splits by position, so no example (object at a given index) is in both; input order is kept
    within each of ``(train, test)``.  Raises ``ValueError`` when a task has no more than
    ``test_per_task`` examples (its train split would be empty).
    """
    if test_per_task < 1:
        raise ValueError(f"test_per_task must be >= 1, got {test_per_task}")
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    test_idx: set[int] = set()
    for task in sorted(by_task):
        idx = by_task[task]
        if len(idx) <= test_per_task:
            raise ValueError(f"task {task!r} has {len(idx)} examples, need > test_per_task={test_per_task}")
        test_idx.update(random.Random(f"{seed}:{task}:test").sample(idx, test_per_task))
    train = [ex for i, ex in enumerate(examples) if i not in test_idx]
    test = [ex for i, ex in enumerate(examples) if i in test_idx]
    return train, test


# --------------------------------------------------------------------------------------------------
# Pretraining text


def is_english_text(text: str) -> bool:
    """At least 20 characters, >= 95% of them ASCII (drops non-Latin scripts, emoji, IPA)."""
    if len(text) < 20:
        return False
    return sum(c.isascii() for c in text) >= 0.95 * len(text)


def text_records(
    folder: Path,
    *,
    banned_folders: Iterable[str],
    banned_names: Iterable[str] = (),
    max_chars_per_task: int = 40_000,
) -> list[tuple[str, str]]:
    """``(task name, text)`` pairs for pretraining, sorted by task name, then file order.

    ``text`` is ``input + " " + first target`` (just the input when the example has no target).
    Left out: every task whose top-level folder is in ``banned_folders`` and every task named in
    ``banned_names``.  Kept: records of >= 20 characters with >= 95% ASCII, taken per task in file
    order until the next one would take the task past ``max_chars_per_task`` characters.
    """
    banned_folders, banned_names = set(banned_folders), set(banned_names)
    out: list[tuple[str, str]] = []
    for name in task_names(folder):
        if folder_of(name) in banned_folders or name in banned_names:
            continue
        used = 0
        for record in iter_task(folder, name):
            targets = record["targets"]
            text = record["input"].strip()
            if targets and str(targets[0]).strip():
                text = f"{text} {str(targets[0]).strip()}"
            if not is_english_text(text):
                continue
            if used + len(text) > max_chars_per_task:
                break
            out.append((name, text))
            used += len(text)
    return out
