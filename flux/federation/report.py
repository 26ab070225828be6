"""Everything a run reports, in one object: the saved config, ``base.json``, one record per
round in ``metrics.jsonl``, the progress bar, notices, and at the end ``summary.json``,
``accuracy.png`` and ``table.md``.

The engine hands it numbers and words; only the lead rank (rank 0) writes or prints.  Notices
go to ``stream`` (stderr by default) with a neutral ``[flux]`` prefix: the engine is a library,
the CLI decides what else to print.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, TextIO


def _median(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def critical_overhead_fraction(records: list[dict]) -> float:
    """Share of the simulated run time that is method overhead on the critical path
    (``critical_overhead_s`` over ``round_sim_s``, summed over rounds)."""
    sim = sum(x.get("round_sim_s", 0.0) for x in records)
    return sum(x.get("critical_overhead_s", 0.0) for x in records) / sim if sim > 0 else 0.0


# the curves worth plotting against simulated time as well as rounds
SIM_TIME_CURVES = ("accuracy", "loss")


def _tensorboard_writer(log_dir: Path, purge_step: int):
    """A ``torch.utils.tensorboard.SummaryWriter``; after a resume, events of rounds that are
    re-run (>= ``purge_step``) are purged so the curves do not fold back."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch imports the tensorboard package lazily
        raise ImportError("log.tensorboard = true needs the tensorboard package: pip install tensorboard") from exc
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def write_scalars(writer, record: dict) -> int:
    """Every finite number of a round's record as a scalar at step = round (``round``, lists and
    strings skipped); accuracy and loss also against simulated seconds.  Returns how many."""
    import math

    step = int(record["round"])
    n = 0
    for key, value in record.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        writer.add_scalar(f"round/{key}", value, step)
        n += 1
        if key in SIM_TIME_CURVES and record.get("sim_s") is not None:
            # TensorBoard steps are integers: simulated milliseconds
            writer.add_scalar(f"{key}_vs_sim_s/{key}", value, int(round(1000 * record["sim_s"])))
    writer.flush()
    return n


class RunReporter:
    """The run's outputs under ``out`` (module docstring).

    Args:
        out: the run directory.
        lead: whether this rank writes and prints (rank 0).
        progress: show a progress bar (tqdm on ``stream``).
        stream: where notices and the progress bar go.
    """

    def __init__(self, out: Path, *, lead: bool, progress: bool, stream: TextIO | None = None,
                 tensorboard: bool = False) -> None:
        self.out, self.lead = Path(out), lead
        self.progress = progress and lead
        self.stream = stream if stream is not None else sys.stderr
        self.metrics = None
        self._bar = None
        self.tensorboard = tensorboard and lead
        self._tb = None

    def start(self, config_toml: str, completed_rounds: int) -> None:
        """Save the resolved config and drop metrics of rounds after ``completed_rounds`` (they
        are re-run after a resume)."""
        if not self.lead:
            return
        from flux.federation.metrics import MetricsWriter

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.toml").write_text(config_toml)
        self.metrics = MetricsWriter(self.out)
        self.metrics.truncate_after(completed_rounds)
        if self.tensorboard:
            self._tb = _tensorboard_writer(self.out / "tensorboard", purge_step=completed_rounds + 1)

    def notice(self, message: str) -> None:
        """A one-line message for the user (resumes, rejected updates)."""
        if self.lead:
            print(f"[flux] {message}", file=self.stream)

    def base(self, metrics: dict) -> None:
        """The pretrained model's metrics before round 1 (``base.json``)."""
        if self.lead:
            from flux.federation.metrics import write_json_atomic

            write_json_atomic(self.out / "base.json", metrics)

    # ------------------------------------------------------------------ rounds
    def open_progress(self, total: int, initial: int, label: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, desc=f"flux run [{label}]", disable=not self.progress,
                         file=self.stream, dynamic_ncols=True)

    def round(self, record: dict) -> None:
        """Append a round's record to ``metrics.jsonl`` and advance the progress bar."""
        from flux.federation.metrics import progress_line

        if self.lead and self.metrics is not None:
            try:
                self.metrics.append(record)
            except OSError as exc:
                from flux.federation.checkpoint import storage_error

                raise storage_error(exc, f"appending round {record.get('round')} to {self.metrics.path}") from exc
        if self._tb is not None:
            write_scalars(self._tb, record)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(progress_line(record))

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # ------------------------------------------------------------------ the end
    def finish(self, *, cfg, facts: dict[str, Any]) -> Optional[dict]:
        """Write ``summary.json``, ``accuracy.png`` and ``table.md`` from ``metrics.jsonl``;
        ``facts`` are the run's constants (model hash, machine throughput, devices, ...) that go
        into the summary as they are.  Returns the summary (None off the lead rank)."""
        if not self.lead:
            return None
        from flux.federation.metrics import (plot_accuracy, read_metrics, result_table, time_to_accuracy,
                                             write_json_atomic)

        records = read_metrics(self.out)
        tta = time_to_accuracy(records, cfg.target_accuracy)
        accs = [x["accuracy"] for x in records if x.get("accuracy") is not None]
        overhead = sum(x.get("overhead_s", 0.0) for x in records)
        compute = sum(x.get("compute_s", 0.0) for x in records)
        summary = {
            "method": cfg.method,
            "target": cfg.target_accuracy,
            "time_to_accuracy": None if tta is None else {"wall_s": tta["wall_s"], "sim_s": tta["sim_s"],
                                                          "round": tta["round"]},
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "rounds": len(records),
            "model_sha256": facts["model_sha256"],
            "wall_s": records[-1]["wall_s"] if records else 0.0,
            "sim_s": records[-1]["sim_s"] if records else 0.0,
            "peak_memory_bytes": max((x.get("peak_memory_bytes", 0) for x in records), default=0),
            "bytes_up": sum(x.get("bytes_up", 0) for x in records),
            "bytes_down": sum(x.get("bytes_down", 0) for x in records),
            "offload_bytes": sum(x.get("offload_bytes", 0) for x in records),
            "overhead_fraction": overhead / (overhead + compute) if overhead + compute > 0 else 0.0,
            "critical_overhead_fraction": critical_overhead_fraction(records),
            **{k: facts[k] for k in ("world_size", "machine_flops", "devices", "model_params", "pretrain")},
            "base": _read_json(self.out / "base.json"),
            **{k: facts[k] for k in ("task", "test_examples")},
            "method_report": facts.get("method_report", {}),
            "routing_drift_median": _median([x.get("routing_drift") for x in records]),
        }
        write_json_atomic(self.out / "summary.json", summary)
        plot_accuracy(records, self.out / "accuracy.png", target=cfg.target_accuracy,
                      title=f"{cfg.method} on {cfg.dataset.name}")
        (self.out / "table.md").write_text(result_table(records, summary))
        return summary
