"""What a FLUX participant trains in: the global model as each device class sees it, scored.

A participant does not train the global model but a view of it: its tuning experts at full
precision, every other expert merged into its device class's merged-group budget (Eq. 1/2), the
groups stored in ``flux.frozen_format``, built from the int-N copies it downloads
(``download_bits``).  The further that view is from the global model, the less its updates fit the
model they are applied to.  :func:`participant_view_quality` installs, for the first participant
of each device class, the view it would get from the round-1 rule (tuning experts = the
``B_tune`` most activated on its own data, int-N profile), scores it on the run's held-out data
and puts the global model back, once per frozen format asked for: the measurement to choose
``flux.frozen_format`` (and to see how much a small device loses) by, instead of by guess.
``flux evaluate RUN_DIR --views`` prints it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from flux.federation.config import RunConfig
    from flux.federation.workload import Workload


def participant_view_quality(work: "Workload", cfg: "RunConfig", *,
                             formats: Sequence[str] | None = None,
                             method_state: Optional[dict] = None) -> dict[str, Any]:
    """Held-out metrics of the global model and of each device class's FLUX view of it.

    Args:
        work: the run's workload, its global model loaded (:func:`flux.federation.reload.load_run`).
        cfg: the run's config (devices, FLUX options, ``download_bits``, seed).
        formats: ``flux.frozen_format`` values to compare (default: the run's own).
        method_state: the run's checkpointed method state (used for a FLUX run): with ``flux.budget_policy = "measured"``
            the views of the run's own format use the splits the run measured on the pretrained
            model (any other format measures its splits on the model given).

    Returns:
        ``{"global": metrics, "views": [row, ...]}``; a row has ``device`` (class name),
        ``participant``, ``memory_bytes``, ``frozen_format``, ``tuning`` (B_tune), ``merged_groups``
        (the groups its non-tuning experts were merged into), ``non_tuning`` (how many experts
        those groups stand in for) and the view's metrics (``accuracy``, ``loss``, ...).  The
        global model is unchanged afterwards.
    """
    from flux.federation.devices import participant_profiles
    from flux.federation.runner import profile_batches
    from flux.merging.install import uninstall
    from flux.methods.api import RunContext
    from flux.methods.flux import Flux, install_participant_view, most_activated
    from flux.models import evaluate
    from flux.moe.merged_view import FROZEN_FORMATS
    from flux.profiling import profile_model

    formats = list(formats or [cfg.flux.frozen_format])
    unknown = [f for f in formats if f not in FROZEN_FORMATS]
    if unknown:
        raise ValueError(f"unknown frozen format(s) {unknown}; choose from {sorted(FROZEN_FORMATS)}")
    if "nf4" in formats:
        from flux import quant_bnb

        quant_bnb.require("an nf4 view")
    handle = work.handle
    devices = participant_profiles(cfg.devices, cfg.participants, work.model_params)
    firsts: dict[str, int] = {}
    for pid, dev in enumerate(devices):
        firsts.setdefault(dev.name, pid)
    num_experts = [layer.num_experts for layer in handle.moe_layers]
    profiles = {pid: profile_model(work.model.backbone, profile_batches(work.train[pid], None),
                                   bits=cfg.flux.profile_bits, num_samples=len(work.train[pid]))
                for pid in firsts.values()}
    reference = evaluate(work.model, work.test)
    rows = []
    for fmt in formats:
        fmt_cfg = dataclasses.replace(cfg, flux=dataclasses.replace(cfg.flux, frozen_format=fmt))
        method = Flux()  # the budgets exactly as a run with this format derives them
        method.setup(RunContext(cfg=fmt_cfg, work=work, devices=devices, rank=0, world=1))
        if method_state and cfg.method == "flux" and fmt == cfg.flux.frozen_format:
            method.load_state_dict(method_state)
        for name, pid in firsts.items():
            profile = profiles[pid]
            tuning = most_activated(profile, method.budgets[pid].tune)
            plans = install_participant_view(handle, fmt_cfg, tuning, profile,
                                             method.merged_total(pid, tuning, num_experts))
            try:
                metrics = evaluate(work.model, work.test)
            finally:  # the originals stay installed under the view: removing it restores them
                uninstall(handle, write_back=False)
            rows.append({"device": name, "participant": pid, "memory_bytes": int(devices[pid].memory_bytes),
                         "frozen_format": fmt, "tuning": sum(len(t) for t in tuning),
                         "merged_groups": sum(p.num_groups - p.num_tuning for p in plans),
                         "non_tuning": sum(e - len(t) for e, t in zip(num_experts, tuning)), **metrics})
    return {"global": reference, "views": rows}


def views_text(result: dict[str, Any]) -> str:
    """``flux evaluate --views``'s table: the global model, then one row per device class and format."""
    head = result["global"]
    lines = ["| view | frozen format | tuning experts | merged groups (for experts) | accuracy | loss |",
             "|---|---|---|---|---|---|",
             f"| global model | - | - | - | {head['accuracy']:.4f} | {head['loss']:.4f} |"]
    for r in result["views"]:
        lines.append(f"| {r['device']} (participant {r['participant']}) | {r['frozen_format']} | {r['tuning']} | "
                     f"{r['merged_groups']} ({r['non_tuning']}) | {r['accuracy']:.4f} | {r['loss']:.4f} |")
    return "\n".join(lines)
