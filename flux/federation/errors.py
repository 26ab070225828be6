"""Errors of the federation layer (a leaf module: config, devices and the engine all raise them)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value; ``key`` is the dotted key (e.g. ``"faults.dropout"``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def __reduce__(self):  # picklable: bench workers send it back to the parent process
        return (type(self), (self.key, self.message))


class StorageError(RuntimeError):
    """Writing the run's outputs failed (e.g. a full disk); the message says what is intact."""


class RunDirectoryInUse(RuntimeError):
    """Another ``flux run`` holds the output directory's lock."""
