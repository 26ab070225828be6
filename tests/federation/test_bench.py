"""`flux bench` end to end on the reduced CI config: every method runs, all three files appear,
and the summary math (medians, speedup over the best baseline) is right on hand-made inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flux.bench import (BenchConfigError, load_bench_config, median_curve, overrides_of, speedups, summarize,
                        target_from_fedavg)

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


def test_standard_errors_over_seeds_and_of_the_test_set():
    s = summarize([_run(10, 1, 0.5), _run(30, 3, 0.7), _run(20, 2, 0.6)], 0.5)
    assert s["final_accuracy_se_seeds"] == pytest.approx(0.1 / 3 ** 0.5)
    assert s["final_accuracy_se_test"] == pytest.approx((0.6 * 0.4 / 1200) ** 0.5)
    assert s["base_accuracy"] == 0.25


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


def test_overrides_flatten_nested_tables():
    assert overrides_of({"a": 1, "d": {"name": "x", "n": {"k": True}}}) == ['a=1', 'd.name="x"', 'd.n.k=true']


def test_bench_ci_config_end_to_end(tmp_path):
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, "-m", "flux.cli", "bench", "--config", "benchmarks/tta-ci.toml",
                          "--out", str(out), "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["results"]) == {"chatterbot-tiny", "bigbench-tiny"}
    assert doc["targets"]["chatterbot-tiny"] == 0.25  # settings.target, not the runs' target_accuracy 0.2
    gen = doc["results"]["bigbench-tiny"]
    assert set(gen) == {"fedavg", "fmd", "fmq", "fmes", "flux"}
    assert doc["targets"]["bigbench-tiny"] == pytest.approx(  # the stated rule, from fedavg's runs
        gen["fedavg"]["base_accuracy"] + 0.95 * (gen["fedavg"]["final_accuracy"] - gen["fedavg"]["base_accuracy"]))
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
