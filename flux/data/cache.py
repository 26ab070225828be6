"""The on-disk cache shared by the data layer (downloaded archives, extracted data, tokenizers).

Location: ``$FLUX_CACHE`` if set, else ``~/.cache/flux``.  Everything written here goes through
:func:`atomic_write` / :func:`atomic_dir` (write a temporary sibling, then ``os.replace``), and
anything that is expensive to build is built under :func:`file_lock`, re-checking after the lock is
taken.  So two processes (two pytest workers, two federated ranks on one host) that want the same
entry at the same time neither corrupt it nor build it twice, and a process killed half-way leaves
only a temporary file behind, never a truncated entry.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

ENV_VAR = "FLUX_CACHE"

try:  # POSIX advisory locks; Windows falls back to an O_EXCL lock file below.
    import fcntl
except ImportError:  # pragma: no cover - not reached on Linux/macOS
    fcntl = None  # type: ignore[assignment]


def cache_dir(*parts: str, root: str | os.PathLike | None = None, create: bool = True) -> Path:
    """The cache root (or a sub-folder of it), created on demand.

    ``root`` overrides ``$FLUX_CACHE`` / ``~/.cache/flux`` (tests pass a temporary directory).
    """
    base = Path(root) if root is not None else Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "flux")
    path = base.expanduser().joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float = 1800.0, poll: float = 0.1) -> Iterator[Path]:
    """Exclusive inter-process lock on ``path`` (a ``.lock`` file next to the guarded entry).

    Blocks until the lock is free or ``timeout`` seconds pass (then ``TimeoutError``).  The default
    timeout is long because the guarded work can be a download of a few hundred MB.  The lock file
    itself is left in place: deleting it would race with a process that has just opened it.
    """
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    if fcntl is not None:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for lock {lock_path}") from None
                    time.sleep(poll)
            yield lock_path
        finally:
            # Closing the descriptor releases the flock.
            os.close(fd)
    else:  # pragma: no cover - Windows
        while True:
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for lock {lock_path}") from None
                time.sleep(poll)
        try:
            yield lock_path
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock_path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator:
    """Open a temporary sibling of ``path`` for writing; on success rename it onto ``path``.

    Readers see either the old file or the complete new one.  On an exception the temporary file is
    removed and ``path`` is untouched.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write needs a write mode, got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)  # make the rename itself durable (a crash must not lose it)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (its entries); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it is renamed to ``path``.

    An existing ``path`` is replaced (callers hold a :func:`file_lock` and have decided to rebuild).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
