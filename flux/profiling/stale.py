"""One-round-stale profiling: profile a snapshot of the model in the background.

Round r's profile is computed on round r-1's global model while the participant (or the server)
goes on with other work.  :meth:`StaleProfiler.submit` takes the snapshot synchronously
(:func:`flux.profiling.quantize_model`: packed weights plus a structural skeleton, sharing no
storage with the live model) and copies the batches, so the live model may be trained or
overwritten the moment ``submit`` returns; the forward passes run in a worker thread.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Optional

from torch import nn

from flux.profiling.profile import ModelProfile, _snapshot_sites, profile_model
from flux.profiling.quantized_model import QuantizedModel, quantize_model

_BATCH_KEYS = ("input_ids", "attention_mask", "index")


class StaleProfiler:
    """Background profiler (one worker thread; jobs run in submission order).

    Use as a context manager or call :meth:`close` (waits for pending jobs)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-profile")
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, model: nn.Module, batches: Iterable[dict], *, bits: Optional[int] = 4, group_size: int = 64,
               num_samples: Optional[int] = None, attention: bool = True) -> "Future[ModelProfile]":
        """Snapshot ``model`` now (quantized to ``bits``; None = an exact copy) and profile it over
        ``batches`` (see :func:`profile_model`) in the background.

        Returns:
            A Future whose result is the :class:`ModelProfile` (exceptions are raised by ``result()``).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("StaleProfiler is closed")
            snapshot = model if isinstance(model, QuantizedModel) else quantize_model(model, bits,
                                                                                      group_size=group_size)
            _snapshot_sites(snapshot)  # here, not in the worker (it may patch/unpatch the skeleton)
            # the batches are copied too: a lazy iterator must not read shared state from the worker
            frozen = [{k: batch[k].clone() for k in _BATCH_KEYS if k in batch} for batch in batches]
            return self._pool.submit(profile_model, snapshot, frozen, attention=attention, num_samples=num_samples)

    def close(self) -> None:
        """Wait for the submitted profiles and stop the worker (idempotent)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "StaleProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
