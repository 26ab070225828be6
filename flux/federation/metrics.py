"""Per-round metrics of a run: ``metrics.jsonl`` (one JSON object per round), time-to-accuracy,
the accuracy plot, the markdown result table and the progress-bar line.

Records are written by the runner; the keys used here are ``round``, ``accuracy``, ``loss``,
``wall_s`` and ``sim_s`` (cumulative seconds), ``participants`` and ``dropped`` (lists of ids),
``bytes_up`` and ``bytes_down``.  Missing keys show as "-".
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from flux.data.cache import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` (temp file + fsync + rename)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _parse_lines(path: Path) -> list[dict]:
    """Records of ``path``; a torn last line (killed mid-write) is dropped, a bad line elsewhere
    is an error."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if all(not rest.strip() for rest in lines[i + 1:]):
                break  # only the final line may be incomplete
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({exc})") from None
    return records


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` in file order ([] if there is none)."""
    return _parse_lines(Path(run_dir) / METRICS_FILE)


class MetricsWriter:
    """Appends round records to ``run_dir/metrics.jsonl``, each flushed and fsynced."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_after(self, last_round: int) -> int:
        """Keep only records with ``record["round"] <= last_round`` (1-based round numbers, as in
        the records; i.e. the number of rounds the checkpoint being resumed from completed) and
        drop a torn last line; rounds after the checkpoint are re-run and re-recorded.  Returns
        the number of records kept; ``last_round = 0`` empties the file."""
        records = _parse_lines(self.path)
        kept = [r for r in records if r.get("round", 0) <= last_round]
        if self.path.exists():
            atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
        return len(kept)


# ---------------------------------------------------------------------------- summaries
def _accuracy(record: dict) -> Optional[float]:
    acc = record.get("accuracy")
    return None if acc is None or (isinstance(acc, float) and math.isnan(acc)) else float(acc)


def time_to_accuracy(records: Sequence[dict], target: float) -> Optional[dict]:
    """``{"wall_s", "sim_s", "round"}`` of the first record with accuracy >= ``target``; None if
    no round reached it."""
    return time_to_target(records, target, key="accuracy", higher_is_better=True)


def time_to_target(records: Sequence[dict], target: float, *, key: str, higher_is_better: bool) -> Optional[dict]:
    """``{"wall_s", "sim_s", "round"}`` of the first record whose ``key`` reaches ``target``
    (>= when higher is better, e.g. accuracy; <= otherwise, e.g. held-out loss); None if none."""
    for r in records:
        value = r.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if (value >= target) if higher_is_better else (value <= target):
            return {"wall_s": r.get("wall_s"), "sim_s": r.get("sim_s"), "round": r.get("round")}
    return None


def time_to_held_target(records: Sequence[dict], target: float, *, key: str, higher_is_better: bool,
                        margin: float) -> Optional[dict]:
    """Like :func:`time_to_target`, but the first crossing that *holds*: the first record that
    reaches ``target`` after which no evaluated record falls more than ``margin`` short of it
    (below ``target - margin`` when higher is better, above ``target + margin`` otherwise).

    A single lucky evaluation on a zig-zagging curve counts for the plain crossing; this one only
    counts the point from which the run stays at the target (within ``margin``, e.g. one test-set
    standard error: a smaller dip is test noise). None if no crossing holds to the run's end."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    evaluated = [r for r in records if r.get(key) is not None
                 and not (isinstance(r[key], float) and math.isnan(r[key]))]
    sign = 1.0 if higher_is_better else -1.0
    held = None  # the earliest crossing not yet undone by a later dip, scanning backwards
    for r in reversed(evaluated):
        gap = sign * (r[key] - target)  # >= 0: at the target
        if gap < -margin:
            break
        if gap >= 0:
            held = r
    if held is None:
        return None
    return {"wall_s": held.get("wall_s"), "sim_s": held.get("sim_s"), "round": held.get("round")}


def plot_accuracy(records: Sequence[dict], path: str | os.PathLike, *, target: Optional[float] = None,
                  title: str = "") -> None:
    """Accuracy vs measured wall-clock (left) and vs simulated participant clock (right), PNG.

    Uses the Agg canvas directly (no pyplot state, no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [(r.get("wall_s"), r.get("sim_s"), _accuracy(r)) for r in records]
    points = [p for p in points if p[2] is not None]
    fig = Figure(figsize=(10, 4), constrained_layout=True)
    FigureCanvasAgg(fig)
    for i, (label, col) in enumerate((("wall-clock on this machine (s)", 0), ("simulated participant clock (s)", 1))):
        ax = fig.add_subplot(1, 2, i + 1)
        xs = [p[col] for p in points if p[col] is not None]
        ys = [p[2] for p in points if p[col] is not None]
        ax.plot(xs, ys, marker="o", label="accuracy")
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle="--", label=f"target {target:g}")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.0, 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, (list, tuple, set)) else value


def _mb(value: Any) -> Optional[float]:
    return None if value is None else value / 1e6


def result_table(records: Sequence[dict], summary: dict) -> str:
    """Markdown: a header line from ``summary`` (method, target, time-to-accuracy), then one row
    per round (round, accuracy, loss, cumulative wall and simulated seconds, participants
    sampled, dropped, MB uploaded / downloaded)."""
    lines = []
    method = summary.get("method", "run")
    target = summary.get("target")
    tta = summary.get("time_to_accuracy")
    if target is not None:
        reached = (f"reached {target:g} in round {tta.get('round')} after {_fmt(tta.get('sim_s'), '.1f')} s simulated, "
                   f"{_fmt(tta.get('wall_s'), '.1f')} s wall" if tta else f"did not reach {target:g}")
        lines.append(f"**{method}**: {reached}")
    else:
        lines.append(f"**{method}**")
    lines.append("")
    lines.append("| round | accuracy | loss | wall s | sim s | participants | dropped | MB up | MB down |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        lines.append("| " + " | ".join([
            _fmt(r.get("round"), "d"), _fmt(_accuracy(r), ".4f"), _fmt(r.get("loss"), ".4f"),
            _fmt(r.get("wall_s"), ".1f"), _fmt(r.get("sim_s"), ".1f"),
            _fmt(_count(r.get("participants")), "d"), _fmt(_count(r.get("dropped")), "d"),
            _fmt(_mb(r.get("bytes_up")), ".2f"), _fmt(_mb(r.get("bytes_down")), ".2f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def progress_line(record: dict) -> str:
    """Short status for the progress bar, e.g. ``r 3 acc 0.512 loss 1.234 sim 12.3s wall 4.5s``."""
    parts = [f"r {_fmt(record.get('round'), 'd')}"]
    acc = _accuracy(record)
    if acc is not None:
        parts.append(f"acc {acc:.3f}")
    if record.get("loss") is not None:
        parts.append(f"loss {_fmt(record.get('loss'), '.3f')}")
    parts.append(f"sim {_fmt(record.get('sim_s'), '.1f')}s")
    parts.append(f"wall {_fmt(record.get('wall_s'), '.1f')}s")
    dropped = _count(record.get("dropped"))
    if dropped:
        parts.append(f"dropped {dropped}")
    return " ".join(parts)
