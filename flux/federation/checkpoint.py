"""Atomic round checkpoints: ``run_dir/checkpoints/round-NNNNN.ckpt`` plus a ``LATEST`` pointer.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, renamed
over its final name (``os.replace`` is atomic on POSIX), and the directory is fsynced so the
rename survives a power cut.  ``LATEST`` is replaced the same way.  A process killed at any point
therefore leaves either the old or the new checkpoint, never a torn one; leftover temporary
files are ignored by :func:`load_latest` and removed by the next save.

A checkpoint is never a pickle: it is :func:`flux.federation.wire.seal`'s format (a magic, the
SHA-256 of the payload, then a typed header and raw tensor bytes), so loading one builds only
tensors, numbers, strings, containers and a short allow-list of FLUX records, and a truncated or
corrupted file is detected by its checksum.  :func:`load_latest` then falls back to the previous
good checkpoint with a warning.  A write that fails (e.g. a full disk) raises
:class:`~flux.federation.errors.StorageError` and leaves the previous checkpoint and ``LATEST``
untouched (the new file only replaces anything once it is complete).
"""
from __future__ import annotations

import errno
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from flux.data.cache import atomic_write_bytes
from flux.federation.errors import StorageError
from flux.federation.wire import seal, unseal

CHECKPOINT_DIR = "checkpoints"
LATEST = "LATEST"
_NAME = re.compile(r"^round-(\d{5,})\.ckpt$")


def checkpoint_path(run_dir: str | os.PathLike, round_index: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{round_index:05d}.ckpt"


def _rounds_on_disk(directory: Path) -> list[int]:
    rounds = []
    for p in directory.iterdir() if directory.is_dir() else ():
        m = _NAME.match(p.name)
        if m:
            rounds.append(int(m.group(1)))
    return sorted(rounds)


def save_checkpoint(run_dir: str | os.PathLike, round_index: int, state: dict, *, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``round_index`` and point ``LATEST`` at it.

    Keeps the ``keep`` newest checkpoints up to ``round_index`` (>= 1); deletes older ones,
    any of later rounds (left by a run that was resumed from an earlier round) and stale temp
    files.  Returns the checkpoint's path.
    """
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"round_index must be an int >= 0, got {round_index!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(run_dir) / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(run_dir, round_index)
    data = seal(state)
    try:
        atomic_write_bytes(path, data)
        atomic_write_bytes(directory / LATEST, f"{path.name}\n".encode())
    except OSError as exc:
        raise storage_error(exc, f"writing checkpoint {path} ({len(data)} bytes)") from exc
    # Newer checkpoints belong to an abandoned timeline (a resumed run re-does those rounds).
    older = [r for r in _rounds_on_disk(directory) if r <= round_index]
    stale = [r for r in _rounds_on_disk(directory) if r > round_index] + older[:-keep]
    for r in stale:
        checkpoint_path(run_dir, r).unlink(missing_ok=True)
    for p in directory.glob(".*.tmp"):  # temp files of writers killed mid-write (ours are renamed)
        p.unlink(missing_ok=True)
    return path


def storage_error(exc: OSError, what: str) -> StorageError:
    """A clear error for a failed write; says that the previous checkpoint is intact."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = "the disk is full" if full else f"{exc.strerror or exc}"
    return StorageError(f"{what} failed: {cause}. The previous checkpoint is intact; free space and resume "
                        f"with --resume.")


def _load(path: Path) -> dict:
    state = unseal(path.read_bytes())
    if not isinstance(state, dict):
        raise ValueError(f"a checkpoint holds a dict, {path} holds a {type(state).__name__}")
    return state


def load_latest(run_dir: str | os.PathLike) -> Optional[tuple[int, dict]]:
    """``(round_index, state)`` of the newest readable checkpoint, or None if there is none.

    Tries the checkpoint ``LATEST`` names first, then the others newest first; a checkpoint that
    fails to load is skipped with a warning (e.g. truncated by a full disk).
    """
    directory = Path(run_dir) / CHECKPOINT_DIR
    candidates = list(reversed(_rounds_on_disk(directory)))
    latest_file = directory / LATEST
    if latest_file.exists():
        m = _NAME.match(latest_file.read_text().strip())
        if m and int(m.group(1)) in candidates:
            candidates.remove(int(m.group(1)))
            candidates.insert(0, int(m.group(1)))
    for r in candidates:
        path = checkpoint_path(run_dir, r)
        try:
            return r, _load(path)
        except Exception as exc:  # any unreadable file: fall back to an older one
            warnings.warn(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
                          "falling back to the previous one", RuntimeWarning, stacklevel=2)
    return None


def rng_state() -> dict[str, Any]:
    """States of torch (CPU and, if present, CUDA), numpy and Python ``random`` generators."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
