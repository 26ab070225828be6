"""``flux bench``: time-to-accuracy of FLUX against the baselines, same data, model, seeds and
participant profiles, over several settings.

Config (TOML, e.g. ``benchmarks/tta.toml``)::

    methods = ["fedavg", "fmd", "fmq", "fmes", "flux"]
    seeds = [0, 1]
    [base]                      # RunConfig keys shared by every run
    rounds = 10
    [[settings]]
    name = "sarcasm-mixtral"
    target_from_fedavg = 0.95   # or target = 0.486 (stated); neither: the runs' target_accuracy
    target_metric = "accuracy"  # or "loss"
    time_budget_from_fedavg = 48  # optional: the other methods get fedavg's simulated time (same
                                  # seed) instead of its rounds, at most 48 rounds
    [settings.config]           # RunConfig keys of this setting (dotted or nested)
    dataset.name = "sarcasm"

Every (setting, method, seed) is one ``flux run`` into ``DIR/runs/<setting>/<method>/seed<s>``
(already finished runs are reused, so an interrupted bench continues where it stopped).  Results:
``DIR/results.json`` ({setting: {method: {reached, rounds_to_target, tta_sim_s, tta_wall_s,
final_accuracy, peak_memory_bytes, bytes_moved, ...}}}, medians over seeds, plus each seed's
``tta_sim_s_per_seed``, and ``tta_held_sim_s``: the first crossing after which the curve stays
within one test-set standard error of the target; ``flux_vs_baselines`` holds FLUX's speedup
over the fastest baseline with its paired bootstrap interval over seeds, on both crossings),
``DIR/table.md`` and ``DIR/tta.png`` (accuracy over simulated time, one curve per method, the
target as a line).  ``flux bench --seeds 0,1,2,3,4`` replaces the config's seeds (runs of seeds
already done are reused).
"""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Optional, Sequence

from flux.methods.registry import BASELINES as BASELINE_METHODS  # the approaches FLUX replaces
from flux.methods.registry import method_names, method_problem

# what a setting's target is measured on, and whether higher is better: test accuracy, or the
# held-out loss (generative settings whose multiple-choice accuracy a small model cannot move)
TARGET_METRICS: dict[str, bool] = {"accuracy": True, "loss": False}

SETTING_KEYS = ("name", "config", "target", "target_from_fedavg", "target_metric", "time_budget_from_fedavg")

# coverage of the paired bootstrap interval reported with FLUX's speedup (speedup_interval)
SPEEDUP_INTERVAL_LEVEL = 0.9


def _metric_of(setting: dict) -> str:
    return setting.get("target_metric", "accuracy")


def final_value(run: dict, metric: str) -> Optional[float]:
    """A run's last evaluated ``metric`` (accuracy or loss)."""
    if metric == "accuracy":
        return run["summary"]["final_accuracy"]
    values = [r.get(metric) for r in run["metrics"] if r.get(metric) is not None]
    return values[-1] if values else None


class BenchConfigError(ValueError):
    """A bad bench config; the message names the key."""


def _flatten(prefix: str, obj: Any, out: list[str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out.append(f"{prefix}={json.dumps(obj)}")


def overrides_of(*tables: dict) -> list[str]:
    """``key=value`` overrides (values as TOML/JSON literals) for ``flux.federation.config.load_config``."""
    out: list[str] = []
    for table in tables:
        _flatten("", table, out)
    return out


def _chosen_settings(all_settings: list, names: Optional[Sequence[str]], path) -> list:
    """``all_settings`` restricted to ``names`` (None: all of them); an unknown name is an error
    naming the config's settings, not a silently empty bench."""
    if names is None:
        return all_settings
    known = [s["name"] for s in all_settings]
    missing = [n for n in names if n not in known]
    if missing or not names:
        raise BenchConfigError(f"--settings {','.join(names)!r}: {path} has settings {known}")
    return [s for s in all_settings if s["name"] in set(names)]


def load_bench_config(path: str | Path, *, methods: Optional[Sequence[str]] = None,
                      seeds: Optional[Sequence[int]] = None, settings: Optional[Sequence[str]] = None) -> dict:
    """The bench config at ``path``, validated; ``methods`` / ``seeds`` replace the config's lists,
    ``settings`` (names) keeps only those settings, in the config's order."""
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    unknown = set(raw) - {"methods", "seeds", "base", "settings"}
    if unknown:
        raise BenchConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: methods, seeds, base, settings")
    chosen = list(methods) if methods else list(raw.get("methods", method_names()))
    bad = {m: method_problem(m) for m in chosen if method_problem(m)}
    if bad:
        raise BenchConfigError("methods: " + "; ".join(bad.values()))
    seeds = list(seeds) if seeds is not None else raw.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise BenchConfigError(f"seeds: must be a non-empty list of ints, got {seeds!r}")
    all_settings = raw.get("settings") or [{"name": "default", "config": {}}]
    # validate the whole config first, so an error's settings[i] is the config's own index
    for i, s in enumerate(all_settings):
        if "name" not in s:
            raise BenchConfigError(f"settings[{i}].name is missing")
        unknown_keys = set(s) - set(SETTING_KEYS)
        if unknown_keys:
            raise BenchConfigError(f"settings[{i}]: unknown key(s) {sorted(unknown_keys)}; known: "
                                   + ", ".join(SETTING_KEYS))
        _check_time_budget(s, i, chosen)
        if s.get("target_metric", "accuracy") not in TARGET_METRICS:
            raise BenchConfigError(f"settings[{i}].target_metric must be one of {list(TARGET_METRICS)}, "
                                   f"got {s.get('target_metric')!r}")
        rule = s.get("target_from_fedavg")
        if rule is not None and not (isinstance(rule, (int, float)) and not isinstance(rule, bool) and 0 < rule <= 1):
            raise BenchConfigError(f"settings[{i}].target_from_fedavg must be a fraction in (0, 1], got {rule!r}")
        if rule is not None and "fedavg" not in chosen:
            raise BenchConfigError(f"settings[{i}].target_from_fedavg needs fedavg among the methods")
        _check_stated_target(s, i)
    return {"methods": chosen, "seeds": seeds, "base": raw.get("base", {}),
            "settings": _chosen_settings(all_settings, settings, path)}


def _check_time_budget(setting: dict, i: int, methods: Sequence[str]) -> None:
    """``time_budget_from_fedavg = N``: every other method runs until the simulated time of
    fedavg's run with the same seed is spent, or N rounds (the cap; >= 1)."""
    cap = setting.get("time_budget_from_fedavg")
    if cap is None:
        return
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise BenchConfigError(f"settings[{i}].time_budget_from_fedavg must be a round cap (int >= 1), got {cap!r}")
    if "fedavg" not in methods:
        raise BenchConfigError(f"settings[{i}].time_budget_from_fedavg needs fedavg among the methods")


def _check_round_cap(setting: dict, fedavg_rounds: int) -> None:
    """A time-budgeted setting's round cap is at least fedavg's rounds (``fedavg_rounds``: its run
    config with every ``--set`` applied): a cap below them would stop a method whose rounds are
    cheaper before it had even as many rounds as the reference, not only before fedavg's time."""
    cap = setting.get("time_budget_from_fedavg")
    if cap is not None and cap < fedavg_rounds:
        raise BenchConfigError(f"setting {setting['name']!r}: time_budget_from_fedavg = {cap} caps the other methods "
                               f"below fedavg's {fedavg_rounds} rounds; give a cap >= {fedavg_rounds}")


def _check_stated_target(setting: dict, i: int) -> None:
    """``target``: a number stated in the config (e.g. a previous bench's fedavg-derived target, to
    measure a variant against it without rerunning fedavg); accuracy in (0, 1], loss > 0."""
    if "target" not in setting:
        return
    value = setting["target"]
    if "target_from_fedavg" in setting:
        raise BenchConfigError(f"settings[{i}]: give target or target_from_fedavg, not both")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BenchConfigError(f"settings[{i}].target must be a number, got {value!r}")
    if _metric_of(setting) == "accuracy" and not 0 < value <= 1:
        raise BenchConfigError(f"settings[{i}].target must be an accuracy in (0, 1], got {value!r}")
    if _metric_of(setting) == "loss" and not value > 0:
        raise BenchConfigError(f"settings[{i}].target must be a loss > 0, got {value!r}")


def run_one(setting: dict, base: dict, method: str, seed: int, out: Path, *, progress: bool,
            sets: Sequence[str] = ()) -> dict:
    """One run (reused if its summary exists and it ran this very config); returns summary +
    per-round metrics.  ``sets``: ``KEY=VALUE`` overrides applied last (``flux bench --set``)."""
    from flux.federation.metrics import read_metrics
    from flux.federation.runner import run

    cfg = run_config(setting, base, method, seed, sets)
    if (out / "summary.json").exists():
        _check_reused(out, cfg)
    else:
        resume = (out / "checkpoints").exists()
        run(cfg, out, resume=resume, progress=progress)
    return {"summary": json.loads((out / "summary.json").read_text()), "metrics": read_metrics(out),
            "rounds_cap": cfg.rounds, "sim_budget_s": cfg.sim_budget_s}


def run_config(setting: dict, base: dict, method: str, seed: int, sets: Sequence[str] = ()):
    """The RunConfig of one (setting, method, seed): defaults <- ``base`` <- the setting's table
    <- method and seed <- ``sets``."""
    from flux.federation.config import load_config

    return load_config(None, overrides_of(base, setting.get("config", {}), {"method": method, "seed": seed})
                       + list(sets))


# Keys that change only what a run reports about itself, never its training: the bench measures
# every run against its own target (computed from the metrics), so they may differ in a reused run.
REPORT_ONLY_KEYS = ("target_accuracy",)


def _check_reused(out: Path, cfg) -> None:
    """A finished run is reused only for the config it ran (its ``config.toml``, read with
    today's defaults for keys it predates; :data:`REPORT_ONLY_KEYS` and the keys only other
    methods read, ``Method.own_config_keys``, aside): reusing it for
    another (a changed bench config or ``--set``) would report one config's numbers under
    another's name."""
    from flux.federation.config import config_to_dict, load_config
    from flux.methods.registry import method_class, method_names

    had, want = [], []
    _flatten("", config_to_dict(load_config(str(out / "config.toml"))), had)
    _flatten("", config_to_dict(cfg), want)
    # keys only another built-in method reads do not change this run
    others = {k for m in method_names() if m != cfg.method for k in method_class(m).own_config_keys}
    mine = set(method_class(cfg.method).own_config_keys)
    differ = sorted({kv.split("=", 1)[0] for kv in set(had) ^ set(want)} - set(REPORT_ONLY_KEYS) - (others - mine))
    if differ:
        raise BenchConfigError(f"{out} holds a finished run of another config (differs in {', '.join(differ)}); "
                               "bench into another --out, or delete that run to redo it")


def _median(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _stderr(xs: list) -> Optional[float]:
    """Standard error of the mean over seeds (None with fewer than two values)."""
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) >= 2 else None


def _median_reaching(xs: list) -> Optional[float]:
    """Median over every seed of a time-to-target, a seed that never reached counting as
    infinitely late (None when that is the median): dropping those seeds would credit a method
    that misses on some seeds with the mean of its lucky ones."""
    if not xs:
        return None
    mid = statistics.median(math.inf if x is None else x for x in xs)
    return None if math.isinf(mid) else mid


def hold_margin(runs: list[dict], target: float, metric: str) -> float:
    """How far below an accuracy target a run may dip after reaching it and still count as held:
    one binomial standard error of a test accuracy at the target, sqrt(t (1 - t) / n) with n the
    runs' median test-set size (a smaller dip is within the test set's own noise). 0 for a loss
    target (no test-set noise model: any rise above it undoes the crossing)."""
    if metric != "accuracy":
        return 0.0
    n = _median([r["summary"].get("test_examples") for r in runs])
    if not n or not 0 <= target <= 1:
        return 0.0
    return (target * (1 - target) / n) ** 0.5


def summarize(runs: list[dict], target: float, metric: str = "accuracy") -> dict:
    """Medians (and standard errors) over seeds of one (setting, method); time-to-target is
    recomputed from each run's metrics for the bench's ``target`` on ``metric``, both as the first
    crossing (``tta_sim_s``) and as the first crossing that holds to the run's end within
    :func:`hold_margin` (``tta_held_sim_s``)."""
    from flux.federation.metrics import time_to_held_target, time_to_target

    higher = TARGET_METRICS[metric]
    margin = hold_margin(runs, target, metric)
    tta_sim, tta_wall, rounds, held_sim = [], [], [], []
    for r in runs:
        tta = time_to_target(r["metrics"], target, key=metric, higher_is_better=higher)
        tta_sim.append(tta["sim_s"] if tta else None)
        tta_wall.append(tta["wall_s"] if tta else None)
        rounds.append(tta.get("round") if tta else None)
        held = time_to_held_target(r["metrics"], target, key=metric, higher_is_better=higher, margin=margin)
        held_sim.append(held["sim_s"] if held else None)
    reached = sum(t is not None for t in tta_sim)
    half = reached * 2 > len(runs)  # the median seed reached the target
    held_reached = sum(t is not None for t in held_sim)
    return {
        "metric": metric,
        "reached": half,
        "reached_seeds": f"{reached}/{len(runs)}",
        "rounds_to_target": _median_reaching(rounds),
        "tta_sim_s": _median_reaching(tta_sim),
        "tta_wall_s": _median_reaching(tta_wall),
        # per seed, in the bench's seed order (None: never reached), for paired comparisons
        "tta_sim_s_per_seed": tta_sim,
        # the crossing that holds: from there on no evaluation is more than hold_margin short
        "hold_margin": margin,
        "reached_held": held_reached * 2 > len(runs),
        "reached_held_seeds": f"{held_reached}/{len(runs)}",
        "tta_held_sim_s": _median_reaching(held_sim),
        "tta_held_sim_s_per_seed": held_sim,
        # median simulated seconds between evaluations: a run evaluated more often has more
        # chances to dip, so the held crossing is compared knowing each method's cadence
        "eval_interval_s": _median([_eval_interval(r["metrics"], metric) for r in runs]),
        "final_loss": _median([final_value(r, "loss") for r in runs]),
        "base_loss": _median([(r["summary"].get("base") or {}).get("loss") for r in runs]),
        "final_accuracy": _median([r["summary"]["final_accuracy"] for r in runs]),
        "final_accuracy_se_seeds": _stderr([r["summary"]["final_accuracy"] for r in runs]),
        # binomial standard error of one run's test accuracy: the test set's own noise
        "final_accuracy_se_test": _binomial_se(runs),
        "base_accuracy": _median([(r["summary"].get("base") or {}).get("accuracy") for r in runs]),
        # what predicting each task's most frequent answer scores on the test set (runs before
        # December 2026 did not record it: None)
        "majority_accuracy": _median([(r["summary"].get("base") or {}).get("majority_accuracy") for r in runs]),
        "routing_drift_median": _median([r["summary"].get("routing_drift_median") for r in runs]),
        "best_accuracy": _median([r["summary"]["best_accuracy"] for r in runs]),
        "peak_memory_bytes": _median([r["summary"]["peak_memory_bytes"] for r in runs]),
        "bytes_moved": _median([r["summary"]["bytes_up"] + r["summary"]["bytes_down"] + r["summary"]["offload_bytes"]
                                for r in runs]),
        "sim_s": _median([r["summary"]["sim_s"] for r in runs]),
        "wall_s": _median([r["summary"]["wall_s"] for r in runs]),
        "overhead_fraction": _median([r["summary"].get("overhead_fraction") for r in runs]),
        "critical_overhead_fraction": _median([r["summary"].get("critical_overhead_fraction") for r in runs]),
        "seeds": len(runs),
        **_budget_use(runs),
    }


def _eval_interval(records: list[dict], metric: str) -> Optional[float]:
    """Median simulated seconds between a run's consecutive evaluations of ``metric``."""
    times = [r["sim_s"] for r in records if r.get(metric) is not None and r.get("sim_s") is not None]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps) if gaps else None


def _budget_use(runs: list[dict]) -> dict:
    """How much of a simulated-time budget (``time_budget_from_fedavg``) the runs spent:
    ``budget_share`` (median over seeds of the run's simulated seconds / its budget; None for
    runs without one) and ``capped_seeds`` (runs the round cap ended before their budget, whose
    final accuracy is therefore measured earlier than fedavg's)."""
    budgeted = [r for r in runs if r.get("sim_budget_s")]
    if not budgeted:
        return {"budget_share": None, "capped_seeds": 0}
    capped = sum(r["summary"]["rounds"] >= r["rounds_cap"] and r["summary"]["sim_s"] < r["sim_budget_s"]
                 for r in budgeted)
    return {"budget_share": _median([r["summary"]["sim_s"] / r["sim_budget_s"] for r in budgeted]),
            "capped_seeds": capped}


def _binomial_se(runs: list[dict]) -> Optional[float]:
    accs = [r["summary"]["final_accuracy"] for r in runs if r["summary"].get("final_accuracy") is not None]
    n = _median([r["summary"].get("test_examples") for r in runs])
    if not accs or not n:
        return None
    p = statistics.median(accs)
    return (p * (1 - p) / n) ** 0.5


def _ratio_of_medians(base: list[float], flux: list[float]) -> Optional[float]:
    """median(base) / median(flux) with never = inf: inf when only the baseline never reaches,
    0 when only FLUX never does, None when neither does (no time to compare)."""
    b, f = statistics.median(base), statistics.median(flux)
    if math.isinf(b) and math.isinf(f):
        return None
    return math.inf if math.isinf(b) else 0.0 if math.isinf(f) else b / f


def speedup_interval(base: Optional[Sequence[Optional[float]]], flux: Optional[Sequence[Optional[float]]], *,
                     level: float = SPEEDUP_INTERVAL_LEVEL, draws: int = 2000,
                     seed: int = 0) -> Optional[list[Optional[float]]]:
    """Paired bootstrap interval of FLUX's time-to-target speedup over seeds.

    Seeds are paired (the same seed gives every method the same data, partition and participant
    sampling), so each draw resamples seed *indices* with replacement and takes
    median(baseline) / median(FLUX) over them, a never-reached seed counting as infinitely late.

    Args:
        base, flux: per seed, the simulated time-to-target (None: never), same seed order.
        level: central coverage of the interval, in (0, 1).
        draws: bootstrap resamples; ``seed``: their random stream (the interval is reproducible).

    Returns:
        {"low", "high", "left_out"}: the interval (high None: unbounded, i.e. in the upper tail
        the baseline never reached) over the draws that compare anything, and the share of draws
        left out because neither method reached on their median seed; None with fewer than 3
        paired seeds (too few for an interval) or when no draw compares anything.
    """
    if base is None or flux is None or len(base) != len(flux) or len(base) < 3:
        return None
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    b = [math.inf if x is None else float(x) for x in base]
    f = [math.inf if x is None else float(x) for x in flux]
    rng = random.Random(seed)
    n = len(b)
    ratios = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        r = _ratio_of_medians([b[i] for i in idx], [f[i] for i in idx])
        if r is not None:
            ratios.append(r)
    if not ratios:
        return None
    ratios.sort()
    tail = (1 - level) / 2
    lo = ratios[min(len(ratios) - 1, int(math.floor(tail * len(ratios))))]
    hi = ratios[min(len(ratios) - 1, int(math.ceil((1 - tail) * len(ratios))) - 1)]
    return {"low": lo, "high": None if math.isinf(hi) else hi, "left_out": 1 - len(ratios) / draws}


def speedups(results: dict) -> dict:
    """Per setting: FLUX's simulated TTA speedup over the fastest baseline (fmd/fmq/fmes) that
    reached the target, on the first crossing and on the held one, and its final-accuracy gap to
    fedavg."""
    out = {}
    for setting, by_method in results.items():
        flux_r = by_method.get("flux")
        entry = _speedup_over_best(by_method, reached="reached", time="tta_sim_s", suffix="")
        if "flux_speedup_sim" in entry:
            best = by_method[entry["best_baseline"]]
            entry["flux_speedup_wall"] = best["tta_wall_s"] / flux_r["tta_wall_s"]
        if flux_r and "tta_held_sim_s" in flux_r:  # summaries from before the held crossing lack it
            entry.update(_speedup_over_best(by_method, reached="reached_held", time="tta_held_sim_s", suffix="_held"))
        if flux_r and "fedavg" in by_method and flux_r["final_accuracy"] is not None:
            entry["flux_minus_fedavg_final_accuracy"] = flux_r["final_accuracy"] - by_method["fedavg"]["final_accuracy"]
        if flux_r and "fedavg" in by_method and None not in (flux_r.get("final_loss"), by_method["fedavg"].get("final_loss")):
            entry["flux_minus_fedavg_final_loss"] = flux_r["final_loss"] - by_method["fedavg"]["final_loss"]
        out[setting] = entry
    return out


def _speedup_over_best(by_method: dict, *, reached: str, time: str, suffix: str) -> dict:
    """``best_baseline{suffix}`` (the baseline with the earliest median ``time`` among those whose
    ``reached`` holds) and, when FLUX reached too, ``flux_speedup{suffix}_sim`` (its ratio to
    FLUX's) with ``flux_speedup{suffix}_sim_interval`` (paired bootstrap over the per-seed
    ``{time}_per_seed``)."""
    flux_r = by_method.get("flux")
    base = {m: r for m, r in by_method.items() if m in BASELINE_METHODS and r.get(reached)}
    best = min(base.items(), key=lambda kv: kv[1][time]) if base else None
    entry: dict = {f"best_baseline{suffix}": best[0] if best else None}
    if flux_r and flux_r.get(reached) and best:
        entry[f"flux_speedup{suffix}_sim"] = best[1][time] / flux_r[time]
        interval = speedup_interval(best[1].get(f"{time}_per_seed"), flux_r.get(f"{time}_per_seed"))
        if interval is not None:
            entry[f"flux_speedup{suffix}_sim_interval"] = interval
    return entry


def _held_text(by_method: dict, gains: dict) -> Optional[str]:
    """The line under a table that gives each method's held crossing and FLUX's speedup on it."""
    rows = {m: r for m, r in by_method.items() if "tta_held_sim_s" in r}
    if not rows:
        return None
    margin = next(iter(rows.values()))["hold_margin"]
    fmt = lambda v: "not on the median seed" if v is None else f"at {v:,.0f} s"  # noqa: E731
    every = lambda r: ("" if r.get("eval_interval_s") is None  # noqa: E731
                       else f" (evaluated every {r['eval_interval_s']:,.0f} s)")
    parts = ", ".join(f"{m} {r['reached_held_seeds']} {fmt(r['tta_held_sim_s'])}{every(r)}" for m, r in rows.items())
    what = (f"no later evaluation is more than {margin * 100:.1f} points short of it" if margin
            else "no later evaluation misses it")
    line = (f"Held target (the first crossing after which {what}; median simulated time; a method evaluated "
            f"more often has more chances to dip): {parts}.")
    if "flux_speedup_held_sim" in gains:
        line += (f" FLUX vs best baseline held ({gains['best_baseline_held']}): "
                 f"{gains['flux_speedup_held_sim']:.2f}x{_interval_text(gains.get('flux_speedup_held_sim_interval'))}.")
    elif "flux" in rows and not rows["flux"]["reached_held"]:
        line += " FLUX's crossing did not hold on its median seed."
    elif gains.get("best_baseline_held") is None:
        line += " No memory-limited baseline's crossing held on its median seed."
    return line


def _interval_text(interval: Optional[dict]) -> str:
    if interval is None:
        return ""
    hi = interval["high"]
    left_out = (f", {interval['left_out']:.0%} of the resamples left out: neither reached"
                if interval["left_out"] > 0 else "")
    return (f"; {SPEEDUP_INTERVAL_LEVEL:.0%} paired bootstrap interval over seeds {interval['low']:.2f}x to "
            + ("unbounded" if hi is None else f"{hi:.2f}x") + left_out)


def bench_table(results: dict, gains: dict, targets: dict) -> str:
    lines = []
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for setting, by_method in results.items():
        metric = next((r.get("metric", "accuracy") for r in by_method.values()), "accuracy")
        key = "base_accuracy" if metric == "accuracy" else "base_loss"
        base = next((r[key] for r in by_method.values() if r.get(key) is not None), None)
        lines.append(f"### {setting} (target {'accuracy' if metric == 'accuracy' else 'held-out loss'} "
                     f"{targets[setting]:.3f}; pretrained model before fine-tuning: {fmt(base, '.3f')})\n")
        lines.append("| method | reached | rounds | TTA sim (s) | TTA wall (s) | final acc (± SE seeds) | best acc | "
                     "final loss | peak mem (MB) | moved (MB) | overhead: critical path / work | routing drift |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m, r in by_method.items():
            se = r.get("final_accuracy_se_seeds")
            lines.append(f"| {m} | {r['reached_seeds']} | {fmt(r['rounds_to_target'], '.0f')} | "
                         f"{fmt(r['tta_sim_s'], '.1f')} | {fmt(r['tta_wall_s'], '.1f')} | "
                         f"{fmt(r['final_accuracy'], '.3f')}{'' if se is None else f' ± {se:.3f}'} | "
                         f"{fmt(r.get('best_accuracy'), '.3f')} | {fmt(r.get('final_loss'), '.3f')} | "
                         f"{r['peak_memory_bytes'] / 2**20:.1f} | "
                         f"{r['bytes_moved'] / 2**20:.1f} | {fmt(r.get('critical_overhead_fraction'), '.1%')} / "
                         f"{fmt(r.get('overhead_fraction'), '.1%')} | "
                         f"{fmt(r.get('routing_drift_median'), '.3f')} |")
        g = gains.get(setting, {})
        se_test = next((r.get("final_accuracy_se_test") for r in by_method.values()
                        if r.get("final_accuracy_se_test") is not None), None)
        if se_test is not None:
            lines.append(f"\nTest-set standard error of one accuracy: {se_test * 100:.1f} points.")
        majority = next((r.get("majority_accuracy") for r in by_method.values()
                         if r.get("majority_accuracy") is not None), None)
        if majority is not None:
            lines.append(f"Majority answer on the test set (per task for multiple choice): {majority:.3f} accuracy "
                         "(what learning only the answer prior scores).")
        for m, r in by_method.items():
            if r.get("capped_seeds"):
                lines.append(f"{m}: the round cap (time_budget_from_fedavg) ended {r['capped_seeds']}/{r['seeds']} "
                             f"runs before fedavg's simulated time (median {r['budget_share']:.0%} of it spent); "
                             "their final accuracy is measured that much earlier.")
        if "flux_speedup_sim" in g:
            lines.append(f"FLUX vs best baseline ({g['best_baseline']}): {g['flux_speedup_sim']:.2f}x faster "
                         f"(simulated{_interval_text(g.get('flux_speedup_sim_interval'))}), "
                         f"{g['flux_speedup_wall']:.2f}x (wall).")
        elif not any(m in BASELINE_METHODS for m in by_method):
            lines.append(f"No memory-limited baseline ({', '.join(BASELINE_METHODS)}) in this bench.")
        elif g.get("best_baseline") is None:
            lines.append("No memory-limited baseline reached the target.")
        else:
            lines.append("FLUX did not reach the target.")
        held = _held_text(by_method, g)
        if held is not None:
            lines.append(held)
        if "flux_minus_fedavg_final_accuracy" in g:
            lines.append(f"FLUX final accuracy - fedavg: {g['flux_minus_fedavg_final_accuracy'] * 100:+.1f} points.")
        if metric == "loss" and "flux_minus_fedavg_final_loss" in g:
            lines.append(f"FLUX final held-out loss - fedavg: {g['flux_minus_fedavg_final_loss']:+.3f}.")
        lines.append("")
    return "\n".join(lines)


def median_curve(runs_metrics: list[list[dict]], metric: str = "accuracy") -> list[tuple[float, float, float, float]]:
    """Per evaluated round over seeds: (median sim_s, median, min, max of ``metric``)."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for rows in runs_metrics:
        for r in rows:
            if r.get(metric) is not None:
                by_round.setdefault(r["round"], []).append((r["sim_s"], r[metric]))
    out = []
    for rnd in sorted(by_round):
        pts = by_round[rnd]
        accs = [a for _, a in pts]
        out.append((statistics.median(t for t, _ in pts), statistics.median(accs), min(accs), max(accs)))
    return out


def plot_tta(curves: dict, targets: dict, path: Path, metrics: Optional[dict] = None) -> None:
    """One panel per setting: its target metric (accuracy, or held-out loss) over simulated time,
    one curve per method (median over seeds per round, band = min..max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, (setting, by_method) in zip(axes[0], curves.items()):
        metric = (metrics or {}).get(setting, "accuracy")
        for m, runs_metrics in by_method.items():
            pts = median_curve(runs_metrics, metric)
            if pts:
                xs = [p[0] for p in pts]
                line, = ax.plot(xs, [p[1] for p in pts], marker=".", label=m)
                ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.15)
        ax.axhline(targets[setting], color="grey", linestyle="--", label="target")
        ax.set_title(setting)
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel(("test accuracy" if metric == "accuracy" else f"held-out {metric}") + " (median over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def target_from_fedavg(fedavg_runs: Optional[list[dict]], fraction: float, metric: str = "accuracy") -> float:
    """A setting's target from fedavg's curve: the pretrained model's value of ``metric`` plus
    ``fraction`` of fedavg's median final change of it (a gain in accuracy, a fall in loss; a rule
    stated in the bench config, the same for every method)."""
    if not fedavg_runs:
        raise BenchConfigError("target_from_fedavg needs the fedavg runs of the setting (add fedavg to methods)")
    base = _median([(r["summary"].get("base") or {}).get(metric) for r in fedavg_runs])
    final = _median([final_value(r, metric) for r in fedavg_runs])
    if base is None or final is None:
        raise BenchConfigError(f"target_from_fedavg: the fedavg runs have no base/final {metric}")
    return base + fraction * (final - base)


def _single_thread_worker(parent_pid: Optional[int] = None) -> None:
    # parallel runs share the cores: one thread each (evaluation included, see workload.all_threads)
    os.environ["FLUX_MAX_THREADS"] = "1"
    if parent_pid is not None:
        import threading

        threading.Thread(target=exit_when_orphaned, args=(parent_pid,), daemon=True,
                         name="flux-bench-orphan-watch").start()


def exit_when_orphaned(parent_pid: int, poll_s: float = 2.0) -> None:
    """End this worker process once ``parent_pid`` is no longer its parent: a bench killed from
    outside (SIGKILL, a closed terminal) must not leave its runs burning the cores.  A run it was
    in stays resumable from its last checkpoint."""
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)


def prepare_settings(bench: dict, *, progress: bool) -> None:
    """Build each setting's workload once in this process (tokenizer, data, the one-time
    pretraining on every core), so parallel runs only load caches."""
    from flux.federation.config import load_config
    from flux.federation.workload import build_workload

    for setting in bench["settings"]:
        cfg = load_config(None, overrides_of(bench["base"], setting.get("config", {})))
        if progress:
            print(f"[flux bench] preparing {setting['name']} (data, tokenizer, pretrained model)", file=sys.stderr,
                  flush=True)
        build_workload(cfg, progress=progress)


def _run_one_quiet(args: tuple) -> dict:
    setting, base, method, seed, out, sets = args
    return run_one(setting, base, method, seed, out, progress=False, sets=sets)


def _with_time_budget(task: tuple, fedavg_summary: dict) -> tuple:
    """``task`` with its setting's time budget: fedavg's simulated seconds on the same seed, and
    the setting's round cap."""
    setting, base, method, seed, run_dir, sets = task
    cap = setting["time_budget_from_fedavg"]
    budget = float(fedavg_summary["sim_s"])
    return (setting, base, method, seed, run_dir, tuple(sets) + (f"rounds={cap}", f"sim_budget_s={budget!r}"))


def _run_tasks(tasks: list, *, jobs: int, progress: bool, t0: float, total: int, already: int = 0) -> dict:
    """Run ``tasks`` (``jobs`` > 1: in that many single-threaded processes); (setting name,
    method, seed) -> run_one's result."""
    done: dict = {}
    if not tasks:
        return done
    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                    initializer=_single_thread_worker, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_run_one_quiet, t): t for t in tasks}
            for fut in cf.as_completed(futures):
                setting, _, method, seed, _, _ = futures[fut]
                done[(setting["name"], method, seed)] = fut.result()
                if progress:
                    print(f"[flux bench] {already + len(done)}/{total} done: {setting['name']} / {method} / seed "
                          f"{seed} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        return done
    for setting, base, method, seed, run_dir, run_sets in tasks:
        if progress:
            print(f"[flux bench] {setting['name']} / {method} / seed {seed}  ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        done[(setting["name"], method, seed)] = run_one(setting, base, method, seed, run_dir, progress=progress,
                                                        sets=run_sets)
    return done


def run_bench(config_path: str | Path, out_dir: str | Path, *, methods: Optional[Sequence[str]] = None,
              seeds: Optional[Sequence[int]] = None, sets: Sequence[str] = (),
              method_sets: Sequence[tuple[str, str]] = (), progress: bool = True, jobs: int = 1,
              settings: Optional[Sequence[str]] = None) -> dict:
    """Run every (setting, method, seed) (``settings``: only the settings of those names);
    ``jobs`` > 1 runs that many in parallel processes (deterministic runs are single-threaded,
    so ``jobs`` = cores uses the machine).  ``sets``:
    ``KEY=VALUE`` run-config overrides applied to every run after the config's tables (a
    variant of a bench without a copy of its config).  ``method_sets``: (method, ``KEY=VALUE``)
    pairs applied after ``sets`` to that method's runs only, so the other methods' runs stay the
    same config and are reused (a FLUX variant measured against the baselines' existing runs)."""
    from flux.federation.config import load_config
    from flux.federation.metrics import write_json_atomic

    bench = load_bench_config(config_path, methods=methods, seeds=seeds, settings=settings)
    for method, _ in method_sets:
        if method not in bench["methods"]:
            raise BenchConfigError(f"--set-for names method {method!r}, which this bench does not run "
                                   f"(methods: {', '.join(bench['methods'])})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, curves, targets = {}, {}, {}
    t0 = time.perf_counter()
    first, budgeted = [], []  # budgeted: runs whose simulated-time budget is a fedavg run's
    for setting in bench["settings"]:
        name = setting["name"]
        # validates the setting before anything runs
        reference = load_config(None, overrides_of(bench["base"], setting.get("config", {})) + list(sets))
        _check_round_cap(setting, reference.rounds)
        targets[name] = float(setting.get("target", reference.target_accuracy))
        for method in bench["methods"]:
            for seed in bench["seeds"]:
                run_dir = out / "runs" / name / method.replace(":", "-") / f"seed{seed}"
                run_sets = tuple(sets) + tuple(kv for m, kv in method_sets if m == method)
                task = (setting, bench["base"], method, seed, run_dir, run_sets)
                wait = setting.get("time_budget_from_fedavg") is not None and method != "fedavg"
                (budgeted if wait else first).append(task)
    for setting, base, method, seed, run_dir, run_sets in first:  # fail before anything runs
        if (run_dir / "summary.json").exists():
            _check_reused(run_dir, run_config(setting, base, method, seed, run_sets))
    if jobs > 1:
        prepare_settings(bench, progress=progress)
    total = len(first) + len(budgeted)
    done = _run_tasks(first, jobs=jobs, progress=progress, t0=t0, total=total)
    budgeted = [_with_time_budget(t, done[(t[0]["name"], "fedavg", t[3])]["summary"]) for t in budgeted]
    for setting, base, method, seed, run_dir, run_sets in budgeted:
        if (run_dir / "summary.json").exists():
            _check_reused(run_dir, run_config(setting, base, method, seed, run_sets))
    done.update(_run_tasks(budgeted, jobs=jobs, progress=progress, t0=t0, total=total, already=len(done)))
    tasks = sorted(first + budgeted, key=lambda t: (bench["settings"].index(t[0]), bench["methods"].index(t[2]),
                                                    bench["seeds"].index(t[3])))
    outcomes = [done[(t[0]["name"], t[2], t[3])] for t in tasks]
    for (setting, _, method, _, _, _), outcome in zip(tasks, outcomes):
        name = setting["name"]
        results.setdefault(name, {}).setdefault(method, []).append(outcome)
    metrics = {setting["name"]: _metric_of(setting) for setting in bench["settings"]}
    for setting in bench["settings"]:
        rule = setting.get("target_from_fedavg")
        if rule is not None:
            targets[setting["name"]] = target_from_fedavg(results[setting["name"]].get("fedavg"), float(rule),
                                                          metrics[setting["name"]])
    for name, by_method in results.items():
        curves[name] = {m: [run["metrics"] for run in runs] for m, runs in by_method.items()}
        results[name] = {m: summarize(runs, targets[name], metrics[name]) for m, runs in by_method.items()}
    gains = speedups(results)
    median_curves = {name: {m: [{"sim_s": t, metrics[name]: a, "min": lo, "max": hi}
                                for t, a, lo, hi in median_curve(rm, metrics[name])]
                            for m, rm in by_method.items()} for name, by_method in curves.items()}
    doc = {"results": results, "flux_vs_baselines": gains, "targets": targets, "methods": bench["methods"],
           "curves": median_curves,
           "seeds": bench["seeds"], "config": str(config_path), "sets": list(sets),
           "method_sets": [list(pair) for pair in method_sets],
           "seconds": time.perf_counter() - t0}
    doc["target_metrics"] = metrics
    write_json_atomic(out / "results.json", doc)
    (out / "table.md").write_text(bench_table(results, gains, targets))
    plot_tta(curves, targets, out / "tta.png", metrics)
    return doc


def add_bench_arguments(parser) -> None:
    parser.add_argument("--config", default="benchmarks/tta.toml", help="bench config (TOML)")
    parser.add_argument("--out", default="runs/bench", help="output directory (runs are reused on re-run)")
    parser.add_argument("--methods", help="comma-separated subset, e.g. flux,fmd")
    parser.add_argument("--settings", help="comma-separated names of the config's settings to run, "
                                           "e.g. sarcasm-mixtral (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds replacing the config's, e.g. 0,1,2,3,4")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key in every run, after the config's tables, e.g. "
                             "--set flux.frozen_format=int8 (repeatable)")
    parser.add_argument("--set-for", dest="method_sets", action="append", nargs=2, default=[],
                        metavar=("METHOD", "KEY=VALUE"),
                        help="override a run-config key in METHOD's runs only, after --set, e.g. "
                             "--set-for flux flux.exploration_draw=utility (the other methods' "
                             "finished runs are reused; repeatable)")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="runs in parallel, one process each (deterministic runs use one thread; "
                             "default: the core count, at most 4)")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=bench_command)


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise BenchConfigError(f"--seeds must be comma-separated ints, got {text!r}") from None


def bench_command(args) -> int:
    from flux.federation.config import ConfigError

    try:
        seeds = _parse_seeds(args.seeds) if args.seeds else None
        doc = run_bench(args.config, args.out, methods=args.methods.split(",") if args.methods else None,
                        seeds=seeds, sets=args.sets, method_sets=[tuple(p) for p in args.method_sets],
                        progress=not args.quiet, jobs=args.jobs,
                        settings=args.settings.split(",") if args.settings else None)
    except (BenchConfigError, ConfigError) as exc:
        print(f"flux bench: bad config: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "table.md").read_text())
    print(f"flux bench: {doc['seconds']:.0f} s; results in {args.out}/ (results.json, table.md, tta.png)")
    return 0
