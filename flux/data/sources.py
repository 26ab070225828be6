"""Offline data sources.  Each loader returns a :class:`Dataset` of :class:`Example` records.

Sources (nothing is fetched from a model/data hub):

* ``pydoc``      -- ``pydoc_data.topics`` from the standard library: the Python reference manual's
                    help topics (79 topics, ~465k characters of English), cut into chunks;
                    label = topic key.
* ``chatterbot`` -- the ``chatterbot-corpus`` PyPI package: YAML dialog files, one per topic
                    (English: 2,026 conversations in 21 topics); label = domain = topic.
* ``sarcasm``    -- news headlines, sarcastic (The Onion) or not (HuffPost): the ``sarcasm`` task of
                    the OpenAI ``evals`` wheel on PyPI, fetched into the cache at run time with pip
                    and never committed (:mod:`flux.data.openai_evals`); label = sarcastic or not.
* ``multiemo``   -- MultiEmo sentiment reviews (4 labels x 4 domains), shipped inside the
                    ``bigbench==1.0.0`` sdist, which PyPI no longer serves: it loads only from a
                    cached or copied archive.  Its files carry a canary asking not to be put into
                    training corpora, so they are never committed; label = sentiment, domain =
                    review domain.
* a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` file with configurable text/label/domain
  columns.

:func:`load_dataset` dispatches on a name or a path.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence, overload

from flux.data.cache import atomic_dir, cache_dir, file_lock


class DataUnavailableError(RuntimeError):
    """A source cannot be loaded here (package not installed, download impossible offline, ...).

    The message always says what to run to make it available.
    """


@dataclasses.dataclass(frozen=True)
class Example:
    """One text record.  ``label`` drives label-skew partitioning, ``domain`` the natural-key one."""

    text: str
    label: str | None = None
    domain: str | None = None


class Dataset(Sequence[Example]):
    """An immutable, named list of :class:`Example` with column views and counts."""

    def __init__(self, examples: Iterable[Example], name: str = "dataset") -> None:
        self.examples: tuple[Example, ...] = tuple(examples)
        self.name = name

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> "Dataset": ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Dataset(self.examples[index], self.name)
        return self.examples[index]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, n={len(self)}, labels={len(self.label_counts())}, "
                f"domains={len(self.domain_counts())})")

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    @property
    def labels(self) -> list[str | None]:
        return [e.label for e in self.examples]

    @property
    def domains(self) -> list[str | None]:
        return [e.domain for e in self.examples]

    def label_counts(self) -> dict[str, int]:
        """Examples per label (sorted by label; unlabelled examples are not counted)."""
        return dict(sorted(Counter(e.label for e in self.examples if e.label is not None).items()))

    def domain_counts(self) -> dict[str, int]:
        """Examples per domain (sorted by domain)."""
        return dict(sorted(Counter(e.domain for e in self.examples if e.domain is not None).items()))

    def subset(self, indices: Iterable[int]) -> "Dataset":
        """The examples at ``indices`` (e.g. one participant's share of a partition)."""
        return Dataset((self.examples[i] for i in indices), self.name)


# --------------------------------------------------------------------------------------------------
# pydoc_data.topics (standard library)


def load_pydoc(chunk_chars: int = 1000) -> Dataset:
    """The stdlib's ``pydoc_data.topics`` help texts, cut into chunks of at most ``chunk_chars``.

    Chunks follow paragraph boundaries (blank lines) where possible, so most chunks are readable
    prose or a whole code block; a paragraph longer than ``chunk_chars`` is cut at whitespace.
    label = topic key (e.g. ``"assert"``), domain = None.
    """
    if chunk_chars < 64:
        raise ValueError(f"chunk_chars must be >= 64, got {chunk_chars}")
    from pydoc_data.topics import topics

    examples = []
    for key in sorted(topics):
        for chunk in _chunk_text(topics[key], chunk_chars):
            examples.append(Example(chunk, label=key, domain=None))
    return Dataset(examples, "pydoc")


def _chunk_text(text: str, limit: int) -> list[str]:
    """Greedy paragraph packing into chunks of <= ``limit`` characters."""
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        while len(para) > limit:  # overlong paragraph: cut at the last whitespace before the limit
            cut = para.rfind(" ", limit // 2, limit)
            cut = cut if cut > 0 else limit
            pieces.append(para[:cut])
            para = para[cut:].lstrip(" ")
        pieces.append(para)
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > limit:
            chunks.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


# --------------------------------------------------------------------------------------------------
# chatterbot-corpus (PyPI)

CHATTERBOT_PIP = "python -m pip install -c requirements/constraints.txt chatterbot-corpus"


def chatterbot_data_dir() -> Path:
    """The ``data/`` folder of the installed ``chatterbot-corpus`` package."""
    if importlib.util.find_spec("chatterbot_corpus") is None:
        raise DataUnavailableError(
            f"the chatterbot corpus needs the PyPI package 'chatterbot-corpus': run `{CHATTERBOT_PIP}` "
            "(it is listed in requirements/base.txt)"
        )
    module = importlib.import_module("chatterbot_corpus")
    return Path(module.__file__).resolve().parent / "data"


def load_chatterbot(language: str = "english", turn_sep: str = "\n") -> Dataset:
    """chatterbot-corpus dialogs: one example per conversation, turns joined by ``turn_sep``.

    label = domain = the topic (the YAML file's stem, e.g. ``"tech_support"``): the topic is both
    what a classifier would predict and the corpus's natural key for per-domain partitioning.
    """
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is in requirements/base.txt
        raise DataUnavailableError("the chatterbot corpus needs PyYAML: `python -m pip install pyyaml`") from exc
    folder = chatterbot_data_dir() / language
    if not folder.is_dir():
        available = sorted(p.name for p in folder.parent.iterdir() if p.is_dir())
        raise DataUnavailableError(f"chatterbot-corpus has no language {language!r}; available: {', '.join(available)}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x faster
    examples = []
    for path in sorted(folder.glob("*.yml")):
        with open(path, encoding="utf-8") as fh:
            doc = yaml.load(fh, Loader=loader) or {}
        topic = path.stem
        for conv in doc.get("conversations") or []:
            # A few entries are a bare string instead of a list of turns (e.g. one in trivia.yml).
            turns = [conv] if isinstance(conv, str) else list(conv or [])
            text = turn_sep.join(str(t).strip() for t in turns if t is not None and str(t).strip())
            if text:
                examples.append(Example(text, label=topic, domain=topic))
    if not examples:
        raise DataUnavailableError(f"no conversations found under {folder}")
    return Dataset(examples, "chatterbot")


# --------------------------------------------------------------------------------------------------
# MultiEmo (inside the bigbench==1.0.0 sdist)

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
MULTIEMO_DOMAINS = ("hotels", "medicine", "products", "school")
MULTIEMO_LABELS = ("ambivalent", "negative", "neutral", "positive")
# MultiEmo's fourth domain is university/school reviews; bigbench names its task folders "reviews_*".
_DOMAIN_FOLDER = {"hotels": "hotels", "medicine": "medicine", "products": "products", "school": "reviews"}
# Members we keep: the top-level task.json and <domain>_<level>_<lang>/task.json (the all_* tasks
# are the union of the four domains: skipped, they would only double the disk use).
_MULTIEMO_MEMBER = re.compile(
    r"^[^/]+/bigbench/benchmark_tasks/multiemo/"
    r"(task\.json|(?P<task>(?:hotels|medicine|products|reviews)_(?:text|sentence)_(?P<lang>[a-z]{2}))/task\.json)$"
)


def _pip_download_command(requirement: str, dest: Path, *, sdist: bool) -> list[str]:
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    return [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
            "--disable-pip-version-check", "--no-cache-dir", requirement, "-d", str(dest)]


def fetch_with_pip(requirement: str, filename: str, *, sdist: bool, what: str,
                   root: str | os.PathLike | None = None, timeout: float = 1200.0) -> Path:
    """``<cache>/downloads/<filename>``: the distribution of ``requirement`` (an sdist or a wheel,
    as ``sdist`` says), downloaded with pip once.  ``what`` names the data in error messages.

    Downloads go to a temporary folder first and are renamed into place, under a lock, so a killed
    or concurrent download never leaves a partial archive where a complete one is expected.
    """
    downloads = cache_dir("downloads", root=root)
    target = downloads / filename
    if target.is_file():
        return target
    with file_lock(downloads / f"{filename}.lock", timeout=timeout + 60):
        if target.is_file():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".pip-download.", dir=downloads))
        try:
            cmd = _pip_download_command(requirement, tmp, sdist=sdist)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise DataUnavailableError(
                    f"downloading {requirement} from PyPI timed out after {timeout:.0f}s") from exc
            found = list(tmp.glob(filename))
            if proc.returncode != 0 or not found:
                tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
                flag = "--no-binary :all:" if sdist else "--only-binary :all:"
                raise DataUnavailableError(
                    f"could not download {what} ({requirement} from PyPI; offline?).\n"
                    f"  command: {' '.join(cmd)}\n  pip said: {tail}\n"
                    f"Fix: run `python -m pip download --no-deps {flag} {requirement} -d {downloads}` "
                    f"on a machine that reaches PyPI (or copy {filename} into {downloads}), "
                    f"or point $FLUX_CACHE at a cache that has it."
                )
            os.replace(found[0], target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_bigbench_sdist(root: str | os.PathLike | None = None, timeout: float = 1200.0) -> Path:
    """The ``bigbench==1.0.0`` sdist (~358 MB) in ``<cache>/downloads``, downloaded with pip once.

    PyPI stopped serving it in December 2026 (only ``bigbench==0.0.1``, without the tasks, is
    left): on a machine without a cached or copied archive this raises
    :class:`DataUnavailableError`.  The default data is :mod:`flux.data.openai_evals`.
    """
    return fetch_with_pip(BIGBENCH_REQUIREMENT, BIGBENCH_SDIST, sdist=True, what="the BIG-bench/MultiEmo data",
                          root=root, timeout=timeout)


def _safe_relpath(name: str) -> str:
    """Reject tar member names that could escape the extraction folder."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"unsafe tar member (absolute path): {name!r}")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise ValueError(f"unsafe tar member (parent reference): {name!r}")
    return "/".join(p for p in parts if p not in ("", "."))


def extract_multiemo(sdist: str | os.PathLike, dest: str | os.PathLike, languages: Sequence[str] = ("en",)) -> list[Path]:
    """Extract only ``benchmark_tasks/multiemo/`` task files of ``languages`` from the sdist.

    Every member name is checked (no absolute paths, no ``..``) and only regular files are taken;
    files are written to paths we build ourselves (``dest/<task>/task.json``), so nothing in the
    archive decides where bytes land.  Returns the written paths.
    """
    dest = Path(dest)
    written: list[Path] = []
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:  # streaming: a single pass over the 358 MB archive
            if "benchmark_tasks/multiemo" not in member.name:
                continue  # never extracted, so its name does not matter
            name = _safe_relpath(member.name)
            match = _MULTIEMO_MEMBER.match(name)
            if match is None or not member.isfile():
                continue  # folders, links and anything unexpected are skipped
            if match.group("lang") is not None and match.group("lang") not in languages:
                continue
            rel = Path(match.group("task") or "") / "task.json"
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None  # regular file
            with src, open(out, "wb") as fh:
                shutil.copyfileobj(src, fh, 1 << 20)
            written.append(out)
    return written


def ensure_multiemo(
    root: str | os.PathLike | None = None,
    language: str = "en",
    sdist: str | os.PathLike | None = None,
) -> Path:
    """The folder of extracted MultiEmo task files for ``language``, fetching them if needed.

    Layout: ``<cache>/multiemo/<language>/<task>/task.json``.  Idempotent and safe to call from
    several processes: the folder appears atomically (renamed from a temporary one) under a lock.
    ``sdist`` lets an offline machine use a copied ``bigbench-1.0.0.tar.gz`` instead of pip.
    """
    if not re.fullmatch(r"[a-z]{2}", language):
        raise ValueError(f"language must be a two-letter code like 'en', got {language!r}")
    base = cache_dir("multiemo", root=root)
    folder = base / language
    if (folder / ".complete").is_file():
        return folder
    with file_lock(base / f"{language}.lock"):
        if (folder / ".complete").is_file():
            return folder
        archive = Path(sdist) if sdist is not None else fetch_bigbench_sdist(root=root)
        with atomic_dir(folder) as tmp:
            written = extract_multiemo(archive, tmp, languages=(language,))
            if not any(p.parent.name.endswith(f"_{language}") for p in written):
                raise DataUnavailableError(f"{archive} has no MultiEmo task files for language {language!r}")
            (tmp / ".complete").write_text(f"{BIGBENCH_REQUIREMENT}\n{len(written)} files\n")
    return folder


def load_multiemo(
    level: str = "text",
    domains: Sequence[str] | None = None,
    language: str = "en",
    root: str | os.PathLike | None = None,
    fetch: bool = True,
) -> Dataset:
    """MultiEmo reviews: label = sentiment (ambivalent/negative/neutral/positive), domain = review domain.

    ``level="text"`` gives whole reviews (8,214 non-empty in English), ``"sentence"`` single
    sentences (57,458).  ``domains`` picks a subset of :data:`MULTIEMO_DOMAINS`.  With ``fetch=False`` a
    missing cache raises :class:`DataUnavailableError` instead of downloading.
    """
    if level not in ("text", "sentence"):
        raise ValueError(f"level must be 'text' or 'sentence', got {level!r}")
    wanted = tuple(domains) if domains is not None else MULTIEMO_DOMAINS
    unknown = set(wanted) - set(MULTIEMO_DOMAINS)
    if unknown:
        raise ValueError(f"unknown MultiEmo domain(s) {sorted(unknown)}; known: {MULTIEMO_DOMAINS}")
    if fetch:
        folder = ensure_multiemo(root=root, language=language)
    else:
        folder = multiemo_cached(root=root, language=language)
        if folder is None:
            raise DataUnavailableError(
                f"MultiEmo is not in the cache {cache_dir('multiemo', root=root, create=False)}; "
                "call flux.data.sources.ensure_multiemo() (downloads the bigbench==1.0.0 sdist with pip)")
    examples = []
    for domain in wanted:
        path = folder / f"{_DOMAIN_FOLDER[domain]}_{level}_{language}" / "task.json"
        with open(path, encoding="utf-8") as fh:
            task = json.load(fh)
        for item in task["examples"]:
            if not item["input"].strip():
                continue  # the source has a few empty reviews (1 text, 8 sentences in English)
            scores = item["target_scores"]
            label = max(scores, key=scores.get)  # one-hot target: the class scored 1
            examples.append(Example(item["input"], label=label, domain=domain))
    return Dataset(examples, "multiemo")


def multiemo_cached(root: str | os.PathLike | None = None, language: str = "en") -> Path | None:
    """The extracted MultiEmo folder if it is already in the cache, else None (never downloads)."""
    folder = cache_dir("multiemo", root=root, create=False) / language
    return folder if (folder / ".complete").is_file() else None


# --------------------------------------------------------------------------------------------------
# Local files


def load_jsonl(path: str | os.PathLike, text_key: str = "text", label_key: str | None = "label",
               domain_key: str | None = None) -> Dataset:
    """A JSON-lines file (or a ``.json`` list of objects) with text/label/domain fields.

    A missing label/domain field gives None; a missing text field is an error (with the line number).
    """
    path = Path(path)
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            rows = json.load(fh)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        records = enumerate(rows, 1)
    else:
        def _lines() -> Iterator[tuple[int, dict]]:
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        yield lineno, json.loads(line)
        records = _lines()
    examples = [_record_to_example(row, text_key, label_key, domain_key, f"{path}:{n}") for n, row in records]
    return Dataset(examples, path.stem)


def load_csv(path: str | os.PathLike, text_col: str = "text", label_col: str | None = "label",
             domain_col: str | None = None, delimiter: str | None = None) -> Dataset:
    """A CSV/TSV file with a header row; the delimiter defaults to tab for ``.tsv``, else comma."""
    path = Path(path)
    if delimiter is None:
        delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if reader.fieldnames is None or text_col not in reader.fieldnames:
            raise ValueError(f"{path}: no column {text_col!r} (columns: {reader.fieldnames})")
        examples = [_record_to_example(row, text_col, label_col, domain_col, f"{path}:{n}")
                    for n, row in enumerate(reader, 2)]
    return Dataset(examples, path.stem)


def _record_to_example(row: dict, text_key: str, label_key: str | None, domain_key: str | None, where: str) -> Example:
    if not isinstance(row, dict) or text_key not in row or row[text_key] is None:
        raise ValueError(f"{where}: record has no {text_key!r} field")

    def _opt(key: str | None) -> str | None:
        if key is None or row.get(key) in (None, ""):
            return None
        return str(row[key])

    return Example(str(row[text_key]), label=_opt(label_key), domain=_opt(domain_key))


def load_local(path: str | os.PathLike, text_key: str = "text", label_key: str | None = "label",
               domain_key: str | None = None) -> Dataset:
    """A local file, by suffix: ``.jsonl``/``.json`` or ``.csv``/``.tsv``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return load_jsonl(path, text_key, label_key, domain_key)
    if path.suffix in (".csv", ".tsv"):
        return load_csv(path, text_key, label_key, domain_key)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json, .csv or .tsv)")


# --------------------------------------------------------------------------------------------------

SOURCES = ("sarcasm", "chatterbot", "pydoc", "multiemo")


def load_dataset(name: str | os.PathLike, **kwargs) -> Dataset:
    """Load a source by name (``sarcasm``, ``chatterbot``, ``pydoc``, ``multiemo``) or a local file by path.

    Keyword arguments go to the loader (e.g. ``level="sentence"`` for MultiEmo, ``text_key=`` for a
    local file).
    """
    key = str(name)
    if key == "sarcasm":
        from flux.data.openai_evals import load_sarcasm  # imports this module: only when asked for

        return load_sarcasm(**kwargs)
    if key == "multiemo":
        return load_multiemo(**kwargs)
    if key == "chatterbot":
        return load_chatterbot(**kwargs)
    if key == "pydoc":
        return load_pydoc(**kwargs)
    if Path(key).suffix:
        return load_local(key, **kwargs)
    raise ValueError(f"unknown dataset {key!r}: use one of {', '.join(SOURCES)} or a .jsonl/.csv path")
