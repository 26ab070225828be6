"""A finished (or interrupted) run brought back: its workload rebuilt from ``RUN_DIR/config.toml``
with the model state of its newest checkpoint (:func:`load_run`, used by ``flux export``), and
that model scored on the run's own held-out data (:func:`evaluate_run`, ``flux evaluate``): the
numbers a run logs only at its evaluation rounds, for any checkpoint kept, per task where the
task has several."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # the workload module pulls in torch and the models: imported when a run is loaded
    from flux.federation.config import RunConfig
    from flux.federation.workload import Workload


def load_run(run_dir: str | os.PathLike, *, progress: bool = False) -> tuple["Workload", int]:
    """``(workload, rounds completed)``: ``run_dir``'s workload (data, tokenizer, model) rebuilt
    from its ``config.toml``, the global model loaded with its newest readable checkpoint.

    Raises:
        FileNotFoundError: no ``config.toml`` in ``run_dir``.
        LookupError: the run has no readable checkpoint.
        flux.federation.errors.ConfigError: the saved config is invalid here.
    """
    work, rounds, _, _ = _load_checkpointed(run_dir, progress=progress)
    return work, rounds


def _load_checkpointed(run_dir: str | os.PathLike, *, progress: bool) -> tuple["Workload", int, dict, "RunConfig"]:
    """:func:`load_run`, plus the checkpoint's whole state (the method's included) and the
    run's config."""
    from flux.federation.checkpoint import load_latest
    from flux.federation.config import load_config
    from flux.federation.workload import all_threads, build_workload

    run = Path(run_dir)
    config = run / "config.toml"
    if not config.is_file():
        raise FileNotFoundError(f"{run} has no config.toml: not a flux run directory")
    found = load_latest(run)
    if found is None:
        raise LookupError(f"{run} has no readable checkpoint (checkpoints/); was checkpoint.every = 0?")
    cfg = load_config(str(config))
    with all_threads():
        work = build_workload(cfg, progress=progress)
    rounds, state = found
    work.model.load_state_dict(state["model"])
    return work, rounds, state, cfg


def evaluate_run(run_dir: str | os.PathLike, *, progress: bool = False,
                 views: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The held-out metrics of ``run_dir``'s newest checkpoint on the run's test split (the one
    its evaluation rounds used), plus ``round`` (rounds completed) and ``task`` (the workload's
    kind). Multiple-choice runs include ``accuracy_per_task`` and ``loss_per_task``.

    ``views``: also score each device class's FLUX view of that model, once per frozen format
    listed (empty: the run's own ``flux.frozen_format``), as ``result["views"]``
    (:func:`flux.federation.views.participant_view_quality`)."""
    from flux.federation.workload import all_threads
    from flux.models import evaluate

    work, rounds, state, cfg = _load_checkpointed(run_dir, progress=progress)
    with all_threads():  # evaluation does not change the model: any thread count
        result = evaluate(work.model, work.test)
        if views is not None:
            from flux.federation.views import participant_view_quality

            result["views"] = participant_view_quality(work, cfg, formats=list(views) or None,
                                                       method_state=state.get("method"))["views"]
    return {"round": rounds, "task": work.kind, "test_examples": len(work.test), **result}
