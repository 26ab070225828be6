"""`flux bench` end to end on the reduced CI config: every method runs, all three files appear,
and the summary math (medians, speedup over the best baseline) is right on hand-made inputs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flux.bench import (BenchConfigError, bench_table, load_bench_config, median_curve, overrides_of, run_bench,
                        run_config, run_one, speedup_interval, speedups, summarize, target_from_fedavg)
from flux.federation.config import config_to_toml

REPO = Path(__file__).resolve().parents[2]


def _run(sim, wall, final, rnd=3, base=0.25):
    """A finished run whose curve first reaches accuracy 1.0 at (sim, wall) (never when sim is None)."""
    metrics = [{"round": 1, "accuracy": 0.0, "sim_s": 1.0, "wall_s": 0.1}]
    if sim is not None:
        metrics.append({"round": rnd, "accuracy": 1.0, "sim_s": sim, "wall_s": wall})
    return {"summary": {"final_accuracy": final, "best_accuracy": final, "base": {"accuracy": base},
                        "peak_memory_bytes": 10, "bytes_up": 1, "bytes_down": 2, "offload_bytes": 3,
                        "sim_s": 100.0, "wall_s": 10.0, "overhead_fraction": 0.05, "test_examples": 1200},
            "metrics": metrics}


def test_summarize_takes_medians_and_needs_a_majority():
    s = summarize([_run(10, 1, 0.5), _run(30, 3, 0.7), _run(20, 2, 0.6)], 0.5)
    assert s["reached"] and s["tta_sim_s"] == 20 and s["tta_wall_s"] == 2 and s["final_accuracy"] == 0.6
    assert s["bytes_moved"] == 6 and s["reached_seeds"] == "3/3"
    s = summarize([_run(10, 1, 0.5), _run(None, None, 0.4), _run(None, None, 0.3)], 0.5)
    assert not s["reached"] and s["tta_sim_s"] is None and s["reached_seeds"] == "1/3"


def test_a_seed_that_never_reached_counts_as_infinitely_late():
    """2 of 3 seeds reached at 10 and 30: the median seed is the one at 30, not their mean 20."""
    s = summarize([_run(10, 1, 0.5, rnd=2), _run(None, None, 0.4), _run(30, 3, 0.6, rnd=6)], 0.5)
    assert s["reached"] and s["reached_seeds"] == "2/3"
    assert (s["tta_sim_s"], s["tta_wall_s"], s["rounds_to_target"]) == (30, 3, 6)
    # an even count: the mean of the middle two, with never = infinitely late
    s = summarize([_run(10, 1, 0.5), _run(30, 3, 0.6), _run(20, 2, 0.6), _run(None, None, 0.4)], 0.5)
    assert s["tta_sim_s"] == 25
    s = summarize([_run(10, 1, 0.5), _run(None, None, 0.6), _run(20, 2, 0.6), _run(None, None, 0.4)], 0.5)
    assert not s["reached"] and s["tta_sim_s"] is None


def test_speedup_is_over_the_fastest_baseline_that_reached():
    r = {"s": {"flux": summarize([_run(10, 2, 0.6)], 0.5), "fmd": summarize([_run(40, 4, 0.6)], 0.5),
               "fmq": summarize([_run(None, None, 0.3)], 0.5), "fmes": summarize([_run(25, 5, 0.5)], 0.5),
               "fedavg": summarize([_run(5, 1, 0.62)], 0.5)}}
    g = speedups(r)["s"]
    assert g["best_baseline"] == "fmes" and g["flux_speedup_sim"] == pytest.approx(2.5)
    assert g["flux_minus_fedavg_final_accuracy"] == pytest.approx(-0.02)


def test_speedup_interval_is_a_paired_bootstrap_over_seeds():
    # identical ratios on every seed: every resample gives 2x
    assert speedup_interval([20, 40, 60], [10, 20, 30]) == {"low": 2.0, "high": 2.0, "left_out": 0.0}
    # fewer than 3 paired seeds, or unpaired lists: no interval
    assert speedup_interval([20, 40], [10, 20]) is None
    assert speedup_interval([20, 40, 60], [10, 20]) is None
    # mixed seeds: the interval holds the point estimate (ratio of medians) and spans the seeds' ratios
    base, flux = [100, 200, 300, 400, 500], [50, 400, 150, 100, 1000]
    got = speedup_interval(base, flux)
    lo, hi = got["low"], got["high"]
    point = 300 / 150
    assert lo < point < hi and lo >= min(b / f for b, f in zip(base, flux)) and hi <= max(b / f for b, f in zip(base, flux))
    assert speedup_interval(base, flux) == got and got["left_out"] == 0  # reproducible (fixed random stream)
    # FLUX missing the target on most resamples: the low end is 0; the baseline missing: unbounded above
    assert speedup_interval([10, 10, 10], [None, None, 5])["low"] == 0.0
    assert speedup_interval([None, None, 10], [5, 5, 5])["high"] is None
    # seeds where neither reached: the draws whose medians are both such seeds are left out, and counted
    part = speedup_interval([None, None, 10], [None, None, 5])
    assert part["low"] == part["high"] == 2.0 and 0.6 < part["left_out"] < 0.9  # P(median draw is a both-never seed) = 20/27
    # neither ever reached: nothing to compare
    assert speedup_interval([None] * 3, [None] * 3) is None
    with pytest.raises(ValueError, match="level"):
        speedup_interval(base, flux, level=1.0)


def test_speedups_report_the_interval_and_the_table_prints_it():
    seeds = [(10, 40), (20, 50), (30, 60)]
    r = {"s": {"flux": summarize([_run(f, 1, 0.6) for f, _ in seeds], 0.5),
               "fmes": summarize([_run(b, 1, 0.6) for _, b in seeds], 0.5)}}
    assert r["s"]["flux"]["tta_sim_s_per_seed"] == [10, 20, 30]
    g = speedups(r)["s"]
    assert g["flux_speedup_sim"] == pytest.approx(2.5)
    lo, hi = g["flux_speedup_sim_interval"]["low"], g["flux_speedup_sim_interval"]["high"]
    assert 2.0 <= lo <= 2.5 <= hi <= 4.0
    table = bench_table(r, speedups(r), {"s": 0.5})
    assert f"interval over seeds {lo:.2f}x to {hi:.2f}x" in table and "left out" not in table


def test_the_table_says_why_there_is_no_speedup():
    """fedavg does not fit the budget, so it is never the speed-up's reference: a bench with only
    fedavg and FLUX says there is no memory-limited baseline, not that none reached."""
    seeds = [10, 20, 30]
    reached = summarize([_run(t, 1, 0.6) for t in seeds], 0.5)
    missed = summarize([_run(None, None, 0.4) for _ in seeds], 0.5)
    only_fedavg = {"s": {"fedavg": reached, "flux": reached}}
    assert "No memory-limited baseline (fmd, fmq, fmes) in this bench." in bench_table(
        only_fedavg, speedups(only_fedavg), {"s": 0.5})
    fmes_missed = {"s": {"fmes": missed, "flux": reached}}
    assert "No memory-limited baseline reached the target." in bench_table(
        fmes_missed, speedups(fmes_missed), {"s": 0.5})
    flux_missed = {"s": {"fmes": reached, "flux": missed}}
    assert "FLUX did not reach the target." in bench_table(flux_missed, speedups(flux_missed), {"s": 0.5})


def test_standard_errors_over_seeds_and_of_the_test_set():
    s = summarize([_run(10, 1, 0.5), _run(30, 3, 0.7), _run(20, 2, 0.6)], 0.5)
    assert s["final_accuracy_se_seeds"] == pytest.approx(0.1 / 3 ** 0.5)
    assert s["final_accuracy_se_test"] == pytest.approx((0.6 * 0.4 / 1200) ** 0.5)
    assert s["base_accuracy"] == 0.25
    assert s["majority_accuracy"] is None  # runs that did not record it


def test_the_table_states_the_majority_answer_floor():
    runs = [_run(10, 1, 0.6) for _ in range(3)]
    for run, floor in zip(runs, (0.52, 0.55, 0.50)):
        run["summary"]["base"]["majority_accuracy"] = floor
    r = {"s": {"fmes": summarize(runs, 0.5), "flux": summarize(runs, 0.5)}}
    assert r["s"]["flux"]["majority_accuracy"] == pytest.approx(0.52)
    assert "Majority answer on the test set (per task for multiple choice): 0.520 accuracy" in bench_table(
        r, speedups(r), {"s": 0.5})


def _zigzag_run(accs, dt=100.0):
    """A finished run evaluated every ``dt`` simulated seconds with accuracies ``accs``."""
    run = _run(None, None, accs[-1])
    run["metrics"] = [{"round": i + 1, "accuracy": a, "sim_s": dt * (i + 1), "wall_s": float(i + 1)}
                      for i, a in enumerate(accs)]
    return run


def test_the_held_crossing_is_summarized_and_compared_under_the_table():
    """A lucky early crossing that the curve undoes counts for the plain time-to-target only; the
    held one is the crossing from which no evaluation is more than one test-set SE short (1,200
    test examples at a 0.60 target: 1.41 points)."""
    fmes = [_zigzag_run([0.61, 0.50, 0.55, 0.60, 0.59, 0.62]) for _ in range(3)]  # held from 400 s
    flux = [_zigzag_run([0.50, 0.60, 0.58, 0.61, 0.62, 0.61]) for _ in range(3)]  # 0.58: 2 points short
    r = {"s": {"fmes": summarize(fmes, 0.6), "flux": summarize(flux, 0.6)}}
    assert r["s"]["fmes"]["hold_margin"] == pytest.approx((0.6 * 0.4 / 1200) ** 0.5)
    assert r["s"]["fmes"]["tta_sim_s"] == 100.0 and r["s"]["fmes"]["tta_held_sim_s"] == 400.0
    assert r["s"]["flux"]["tta_sim_s"] == 200.0 and r["s"]["flux"]["tta_held_sim_s"] == 400.0
    assert r["s"]["flux"]["tta_held_sim_s_per_seed"] == [400.0] * 3
    g = speedups(r)["s"]
    assert g["flux_speedup_sim"] == pytest.approx(0.5) and g["flux_speedup_held_sim"] == pytest.approx(1.0)
    table = bench_table(r, speedups(r), {"s": 0.6})
    assert r["s"]["flux"]["eval_interval_s"] == 100.0
    assert ("Held target (the first crossing after which no later evaluation is more than 1.4 points short of it; "
            "median simulated time; a method evaluated more often has more chances to dip): fmes 3/3 at 400 s "
            "(evaluated every 100 s), flux 3/3 at 400 s (evaluated every 100 s). FLUX vs best baseline held (fmes): "
            "1.00x" in table)
    # FLUX's crossing never holds when its last evaluation ends short of the margin
    r["s"]["flux"] = summarize([_zigzag_run([0.50, 0.61, 0.57]) for _ in range(3)], 0.6)
    assert r["s"]["flux"]["reached_held_seeds"] == "0/3" and r["s"]["flux"]["tta_held_sim_s"] is None
    assert "FLUX's crossing did not hold on its median seed." in bench_table(r, speedups(r), {"s": 0.6})


def test_the_table_says_when_the_round_cap_ended_runs_before_fedavg_s_time():
    """A time-budgeted run that stops at the round cap with budget left is counted and reported:
    its final accuracy is from earlier in the simulated time than fedavg's."""
    def budgeted(sim_s, rounds, budget=1000.0, cap=36):
        run = _run(10, 1, 0.6)
        run["summary"].update(sim_s=sim_s, rounds=rounds)
        return {**run, "rounds_cap": cap, "sim_budget_s": budget}

    fmes = summarize([budgeted(500.0, 36), budgeted(540.0, 36), budgeted(1010.0, 30)], 0.5)
    assert fmes["capped_seeds"] == 2 and fmes["budget_share"] == pytest.approx(0.54)
    flux = summarize([budgeted(1005.0, 20), budgeted(1001.0, 36)], 0.5)  # ended by the budget
    assert flux["capped_seeds"] == 0 and flux["budget_share"] == pytest.approx(1.003)
    fedavg = summarize([_run(10, 1, 0.6)], 0.5)  # no budget of its own
    assert fedavg["budget_share"] is None and fedavg["capped_seeds"] == 0
    r = {"s": {"fedavg": fedavg, "fmes": fmes, "flux": flux}}
    table = bench_table(r, speedups(r), {"s": 0.5})
    assert ("fmes: the round cap (time_budget_from_fedavg) ended 2/3 runs before fedavg's simulated time "
            "(median 54% of it spent)") in table
    assert "flux: the round cap" not in table and "fedavg: the round cap" not in table


def test_target_from_fedavg_is_the_stated_share_of_its_gain():
    runs = [_run(10, 1, 0.55), _run(10, 1, 0.65), _run(10, 1, 0.6)]
    assert target_from_fedavg(runs, 0.95) == pytest.approx(0.25 + 0.95 * 0.35)
    with pytest.raises(BenchConfigError, match="fedavg"):
        target_from_fedavg(None, 0.95)


def _loss_run(losses, base=6.0):
    """A finished run with held-out loss ``losses`` at rounds 1, 2, ... (sim = 100 s per round)."""
    metrics = [{"round": i + 1, "accuracy": 0.4, "loss": v, "sim_s": 100.0 * (i + 1), "wall_s": 10.0 * (i + 1)}
               for i, v in enumerate(losses)]
    run = _run(None, None, 0.4)
    run["summary"]["base"] = {"accuracy": 0.4, "loss": base}
    run["metrics"] = metrics
    return run


def test_a_loss_target_is_reached_from_above_and_set_from_fedavg_s_fall():
    fedavg = [_loss_run([5.0, 3.0, 2.0]), _loss_run([5.5, 4.0, 3.0]), _loss_run([5.0, 3.5, 2.5])]
    target = target_from_fedavg(fedavg, 0.5, "loss")
    assert target == pytest.approx(6.0 + 0.5 * (2.5 - 6.0))  # base + half of the median fall
    s = summarize([_loss_run([5.0, 4.0, 3.5]), _loss_run([4.0, 3.0, 2.0]), _loss_run([6.0, 5.0, 4.5])], target, "loss")
    assert s["metric"] == "loss" and s["reached_seeds"] == "2/3" and s["reached"]
    assert s["tta_sim_s"] == 200.0 and s["final_loss"] == 3.5 and s["base_loss"] == 6.0  # median of 100, 200, never
    with pytest.raises(BenchConfigError, match="target_metric"):
        bad = Path(__file__).parent / "_bad_metric.toml"
        try:
            bad.write_text('[[settings]]\nname = "x"\ntarget_metric = "f1"\n')
            load_bench_config(bad)
        finally:
            bad.unlink()


def test_median_curve_over_seeds():
    a = [{"round": 1, "accuracy": 0.2, "sim_s": 10.0}, {"round": 2, "accuracy": None, "sim_s": 20.0},
         {"round": 3, "accuracy": 0.5, "sim_s": 30.0}]
    b = [{"round": 1, "accuracy": 0.4, "sim_s": 12.0}, {"round": 3, "accuracy": 0.7, "sim_s": 34.0}]
    c = [{"round": 1, "accuracy": 0.3, "sim_s": 11.0}, {"round": 3, "accuracy": 0.6, "sim_s": 32.0}]
    assert median_curve([a, b, c]) == [(11.0, 0.3, 0.2, 0.4), (32.0, 0.6, 0.5, 0.7)]


def test_bench_config_rejects_a_bad_target_rule(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('methods = ["flux"]\n[[settings]]\nname = "s"\ntarget_from_fedavg = 0.9\n')
    with pytest.raises(BenchConfigError, match="fedavg among the methods"):
        load_bench_config(path)
    path.write_text('[[settings]]\nname = "s"\ntarget_from_fedavg = 2\n')
    with pytest.raises(BenchConfigError, match="fraction"):
        load_bench_config(path)


@pytest.mark.parametrize("setting,match", [
    ('target = 0.5\ntarget_from_fedavg = 0.9', "not both"),
    ('target = 1.5', "accuracy in"),
    ('target = "high"', "a number"),
    ('target = 0.0\ntarget_metric = "loss"', "loss > 0"),
])
def test_bench_config_rejects_a_bad_stated_target(tmp_path, setting, match):
    path = tmp_path / "b.toml"
    path.write_text(f'methods = ["fedavg", "flux"]\n[[settings]]\nname = "s"\n{setting}\n')
    with pytest.raises(BenchConfigError, match=match):
        load_bench_config(path)


def test_a_stated_loss_target_is_used_as_given(tmp_path):
    """A variant measured against a previous bench's target: no fedavg runs, the number from the
    config (not the runs' target_accuracy), time-to-loss from above."""
    path = tmp_path / "b.toml"
    path.write_text('methods = ["flux"]\nseeds = [0]\n[[settings]]\nname = "s"\ntarget = 2.5\n'
                    'target_metric = "loss"\n')
    bench = load_bench_config(path)
    assert bench["settings"][0]["target"] == 2.5
    run = _run(None, None, 0.4)
    run["metrics"] = [{"round": 1, "loss": 3.0, "sim_s": 5.0, "wall_s": 1.0},
                      {"round": 2, "loss": 2.4, "sim_s": 9.0, "wall_s": 2.0}]
    s = summarize([run], 2.5, "loss")
    assert s["reached"] and s["tta_sim_s"] == 9.0


def test_seeds_given_on_the_command_line_replace_the_config_s(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('methods = ["flux"]\nseeds = [0]\n[[settings]]\nname = "s"\ntarget = 0.5\n')
    assert load_bench_config(path)["seeds"] == [0]
    assert load_bench_config(path, seeds=[3, 4])["seeds"] == [3, 4]
    with pytest.raises(BenchConfigError, match="seeds"):
        load_bench_config(path, seeds=[])
    res = subprocess.run([sys.executable, "-m", "flux.cli", "bench", "--config", str(path), "--seeds", "1,x",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2 and "--seeds must be comma-separated ints" in res.stderr


def test_settings_given_on_the_command_line_keep_only_those(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('methods = ["flux"]\n' + "".join(f'[[settings]]\nname = "{n}"\ntarget = 0.5\n'
                                                     for n in ("a", "b", "c")))
    assert [s["name"] for s in load_bench_config(path)["settings"]] == ["a", "b", "c"]
    # the config's order, whatever the command line's
    assert [s["name"] for s in load_bench_config(path, settings=["c", "a"])["settings"]] == ["a", "c"]
    with pytest.raises(BenchConfigError, match=r"has settings \['a', 'b', 'c'\]"):
        load_bench_config(path, settings=["a", "typo"])
    res = subprocess.run([sys.executable, "-m", "flux.cli", "bench", "--config", str(path), "--settings", "nope",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2 and "has settings" in res.stderr and not (tmp_path / "o").exists()


def _finished_run(run_dir: Path, cfg, summary: dict | None = None) -> None:
    """A run directory as a finished `flux run` leaves it (config.toml, summary.json, metrics)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(config_to_toml(cfg))
    (run_dir / "summary.json").write_text(json.dumps(summary or {"final_accuracy": 0.5}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5, "sim_s": 1.0, "wall_s": 1.0}) + "\n")


def test_a_finished_run_is_reused_only_for_the_config_it_ran(tmp_path):
    setting = {"name": "s", "config": {"rounds": 3}}
    cfg = run_config(setting, {"participants": 4}, "flux", 1)
    assert (cfg.rounds, cfg.participants, cfg.method, cfg.seed) == (3, 4, "flux", 1)
    assert run_config(setting, {}, "flux", 1, ["rounds=5"]).rounds == 5  # --set comes last
    run_dir = tmp_path / "runs" / "s" / "flux" / "seed1"
    _finished_run(run_dir, cfg)
    out = run_one(setting, {"participants": 4}, "flux", 1, run_dir, progress=False)
    assert out["summary"] == {"final_accuracy": 0.5} and out["metrics"][0]["round"] == 1
    with pytest.raises(BenchConfigError, match=r"another config \(differs in flux.exploration_draw\)"):
        run_one(setting, {"participants": 4}, "flux", 1, run_dir, progress=False,
                sets=["flux.exploration_draw=utility"])
    # the run's own target only labels its summary (the bench measures against its own): reused
    again = run_one(setting, {"participants": 4}, "flux", 1, run_dir, progress=False, sets=["target_accuracy=0.9"])
    assert again["summary"] == {"final_accuracy": 0.5}
    # keys only another method reads do not make a baseline's run another run; shared ones do
    fedavg_dir = tmp_path / "runs" / "s" / "fedavg" / "seed1"
    _finished_run(fedavg_dir, run_config(setting, {"participants": 4}, "fedavg", 1))
    for key in ("flux.frozen_format=full", "flux.min_group_share=0", "fmq.weight_format=nf4"):
        assert run_one(setting, {"participants": 4}, "fedavg", 1, fedavg_dir, progress=False,
                       sets=[key])["summary"] == {"final_accuracy": 0.5}
    with pytest.raises(BenchConfigError, match=r"differs in flux.profile_bits"):
        run_one(setting, {"participants": 4}, "fedavg", 1, fedavg_dir, progress=False, sets=["flux.profile_bits=8"])
    with pytest.raises(BenchConfigError, match=r"differs in flux.frozen_format"):
        run_one(setting, {"participants": 4}, "flux", 1, run_dir, progress=False, sets=["flux.frozen_format=full"])
    # the whole bench refuses before running anything
    bench = tmp_path / "b.toml"
    bench.write_text('methods = ["flux"]\nseeds = [1, 2]\n[base]\nparticipants = 4\n'
                     '[[settings]]\nname = "s"\ntarget = 0.5\n[settings.config]\nrounds = 3\n')
    with pytest.raises(BenchConfigError, match="differs in flux.max_tune_fraction"):
        run_bench(bench, tmp_path, sets=["flux.max_tune_fraction=0.5"], progress=False)
    assert not (tmp_path / "runs" / "s" / "flux" / "seed2").exists()


def test_a_time_budget_from_fedavg_gives_the_others_its_simulated_time(tmp_path, monkeypatch):
    """fedavg runs first; every other method then runs with rounds = the cap and sim_budget_s =
    the simulated seconds of fedavg's run with the same seed."""
    import flux.bench as bench_mod

    calls = []

    def fake_run_one(setting, base, method, seed, out, *, progress, sets=()):
        cfg = run_config(setting, base, method, seed, sets)
        calls.append((method, seed, cfg.rounds, cfg.sim_budget_s))
        sim = 1000.0 + seed if method == "fedavg" else 400.0
        metrics = [{"round": 1, "accuracy": 0.6 if method == "flux" else 0.4, "loss": 1.0, "sim_s": sim,
                    "wall_s": 1.0}]
        return {"summary": {"final_accuracy": metrics[-1]["accuracy"], "best_accuracy": 0.6, "base": {"accuracy": 0.3},
                            "peak_memory_bytes": 1, "bytes_up": 1, "bytes_down": 1, "offload_bytes": 0,
                            "sim_s": sim, "wall_s": 1.0, "test_examples": 100}, "metrics": metrics}

    monkeypatch.setattr(bench_mod, "run_one", fake_run_one)
    monkeypatch.setattr(bench_mod, "plot_tta", lambda *a, **k: None)
    path = tmp_path / "b.toml"
    path.write_text('methods = ["flux", "fedavg"]\nseeds = [0, 1]\n[base]\nrounds = 12\n[[settings]]\nname = "s"\n'
                    'target = 0.5\ntime_budget_from_fedavg = 40\n')
    doc = run_bench(path, tmp_path / "o", progress=False)
    assert calls[:2] == [("fedavg", 0, 12, 0.0), ("fedavg", 1, 12, 0.0)]  # its own rounds, no budget
    assert sorted(calls[2:]) == [("flux", 0, 40, 1000.0), ("flux", 1, 40, 1001.0)]
    assert list(doc["results"]["s"]) == ["flux", "fedavg"]  # the config's order
    for bad, match in [("time_budget_from_fedavg = 0", "round cap"), ("time_budget_from_fedavg = true", "round cap")]:
        path.write_text(f'methods = ["flux", "fedavg"]\n[[settings]]\nname = "s"\n{bad}\n')
        with pytest.raises(BenchConfigError, match=match):
            load_bench_config(path)
    path.write_text('methods = ["flux"]\n[[settings]]\nname = "s"\ntime_budget_from_fedavg = 30\n')
    with pytest.raises(BenchConfigError, match="needs fedavg"):
        load_bench_config(path)


def test_a_round_cap_below_fedavg_s_rounds_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """The cap bounds the rounds of methods whose rounds are cheaper than fedavg's: below fedavg's
    own rounds (from the setting's config or from --set) it would cut them short of the reference,
    so the bench refuses it, naming the numbers, before a single run."""
    import flux.bench as bench_mod

    ran = []
    monkeypatch.setattr(bench_mod, "run_one", lambda *a, **k: ran.append(a) or {})
    path = tmp_path / "b.toml"
    path.write_text('methods = ["fedavg", "flux"]\n[base]\nrounds = 12\n[[settings]]\nname = "s"\n'
                    'time_budget_from_fedavg = 20\n[settings.config]\nrounds = 24\n')
    with pytest.raises(BenchConfigError, match="caps the other methods below fedavg's 24 rounds"):
        run_bench(path, tmp_path / "o", progress=False)
    path.write_text('methods = ["fedavg", "flux"]\n[base]\nrounds = 12\n[[settings]]\nname = "s"\n'
                    'time_budget_from_fedavg = 20\n')
    with pytest.raises(BenchConfigError, match="below fedavg's 30 rounds"):
        run_bench(path, tmp_path / "o", sets=["rounds=30"], progress=False)
    assert ran == [] and not (tmp_path / "o" / "runs").exists()


def test_set_for_changes_one_method_s_runs_and_reuses_the_others(tmp_path, monkeypatch):
    """A FLUX variant against the baselines' finished runs: --set-for flux changes FLUX's runs
    only, so fedavg's run directory (same config) is reused instead of refused."""
    import flux.bench as bench_mod

    ran = []
    real_run = bench_mod.run_one

    def counting_run_one(setting, base, method, seed, out, *, progress, sets=()):
        if not (out / "summary.json").exists():
            ran.append((method, run_config(setting, base, method, seed, sets).flux.exploration_draw))
            _finished_run(out, run_config(setting, base, method, seed, sets), _run(1.0, 1.0, 0.5)["summary"])
        return real_run(setting, base, method, seed, out, progress=progress, sets=sets)

    monkeypatch.setattr(bench_mod, "run_one", counting_run_one)
    monkeypatch.setattr(bench_mod, "plot_tta", lambda *a, **k: None)
    path = tmp_path / "b.toml"
    path.write_text('methods = ["fedavg", "flux"]\nseeds = [0]\n[[settings]]\nname = "s"\ntarget = 0.5\n')
    run_bench(path, tmp_path / "o", progress=False)
    assert ran == [("fedavg", "uniform"), ("flux", "uniform")]
    variant = tmp_path / "v"
    (variant / "runs" / "s").mkdir(parents=True)
    shutil.copytree(tmp_path / "o" / "runs" / "s" / "fedavg", variant / "runs" / "s" / "fedavg")
    doc = run_bench(path, variant, method_sets=[("flux", "flux.exploration_draw=utility")], progress=False)
    assert ran[2:] == [("flux", "utility")]  # fedavg reused, not rerun
    assert doc["method_sets"] == [["flux", "flux.exploration_draw=utility"]]
    with pytest.raises(BenchConfigError, match="does not run"):
        run_bench(path, variant, method_sets=[("fmes", "rounds=2")], progress=False)
    # --set changes fedavg too, unless only FLUX reads the key
    assert run_bench(path, variant, sets=["flux.exploration_draw=utility"], progress=False)["sets"] == [
        "flux.exploration_draw=utility"]
    assert ran[3:] == []  # both reused: fedavg does not read it, FLUX's run was made with it
    with pytest.raises(BenchConfigError, match="differs in local_steps"):
        run_bench(path, variant, sets=["local_steps=3"], progress=False)


def test_overrides_flatten_nested_tables():
    assert overrides_of({"a": 1, "d": {"name": "x", "n": {"k": True}}}) == ['a=1', 'd.name="x"', 'd.n.k=true']


def test_bench_ci_config_end_to_end(tmp_path):
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, "-m", "flux.cli", "bench", "--config", "benchmarks/tta-ci.toml",
                          "--out", str(out), "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["results"]) == {"chatterbot-tiny", "evals-tiny"}
    assert doc["targets"]["chatterbot-tiny"] == 0.25  # settings.target, not the runs' target_accuracy 0.2
    gen = doc["results"]["evals-tiny"]
    assert set(gen) == {"fedavg", "fmd", "fmq", "fmes", "flux"}
    assert doc["targets"]["evals-tiny"] == pytest.approx(  # the stated rule, from fedavg's runs
        gen["fedavg"]["base_accuracy"] + 0.95 * (gen["fedavg"]["final_accuracy"] - gen["fedavg"]["base_accuracy"]))
    # the time budget: fedavg's 2 rounds; each other method ran until fedavg's simulated time
    # (same seed) was spent, at most 4 rounds, and one that is cheaper per round ran more of them
    budget = json.loads((out / "runs" / "evals-tiny" / "fedavg" / "seed0" / "summary.json").read_text())
    assert budget["rounds"] == 2
    for m in ("fmd", "fmq", "fmes", "flux"):
        s = json.loads((out / "runs" / "evals-tiny" / m / "seed0" / "summary.json").read_text())
        assert 1 <= s["rounds"] <= 4 and (s["rounds"] == 4 or s["sim_s"] >= budget["sim_s"]), m
        if s["rounds"] > 1:  # it stopped in the round that spent the budget, not later
            rows = (out / "runs" / "evals-tiny" / m / "seed0" / "metrics.jsonl").read_text().splitlines()
            assert json.loads(rows[-2])["sim_s"] < budget["sim_s"], m
    methods = doc["results"]["chatterbot-tiny"]
    assert set(methods) == {"fedavg", "fmd", "fmq", "fmes", "flux"}
    for name, r in methods.items():
        assert 0.0 <= r["final_accuracy"] <= 1.0, name
        assert r["peak_memory_bytes"] > 0, name
    # the memory-limited methods stay below the unlimited reference
    for name in ("fmq", "fmes", "flux"):
        assert methods[name]["peak_memory_bytes"] < methods["fedavg"]["peak_memory_bytes"], name
    assert methods["fmd"]["bytes_moved"] > methods["fedavg"]["bytes_moved"]  # offloading traffic
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert (out / "tta.png").stat().st_size > 1000


def test_a_worker_exits_when_the_bench_is_killed():
    """Parallel bench workers watch their parent: SIGKILL the bench, the worker ends too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    worker = ("import os; from flux.bench import exit_when_orphaned; print(os.getpid(), flush=True); "
              "exit_when_orphaned(os.getppid(), 0.1)")
    bench = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {worker!r}]).wait()"
    parent = subprocess.Popen([sys.executable, "-c", bench], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())

    def alive() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
        except FileNotFoundError:
            return False

    time.sleep(0.5)
    assert alive()  # the parent is there: it keeps running
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    ended = not alive()
    if not ended:
        os.kill(pid, signal.SIGKILL)
    assert ended


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_bench_configs_are_valid(path):
    """Every bench config we ship loads, each setting's run config validates (a misspelt key fails
    here, not an hour into a bench), and a time-budgeted setting's round cap is at least fedavg's
    rounds: a method with cheaper rounds must get at least as many as the reference."""
    from flux.bench import _check_round_cap
    from flux.federation.config import load_config

    bench = load_bench_config(path)
    for setting in bench["settings"]:
        cfg = load_config(None, overrides_of(bench["base"], setting.get("config", {})))
        _check_round_cap(setting, cfg.rounds)  # what run_bench checks before anything runs
