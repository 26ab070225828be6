"""`flux bench` end to end on the reduced CI config: every method runs, all three files appear,
and the summary math (medians, speedup over the best baseline) is right on hand-made inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flux.bench import overrides_of, speedups, summarize

REPO = Path(__file__).resolve().parents[2]


def _run(sim, wall, final, rnd=3):
    tta = None if sim is None else {"sim_s": sim, "wall_s": wall, "round": rnd}
    return {"summary": {"time_to_accuracy": tta, "final_accuracy": final, "best_accuracy": final,
                        "peak_memory_bytes": 10, "bytes_up": 1, "bytes_down": 2, "offload_bytes": 3,
                        "sim_s": 100.0, "wall_s": 10.0, "overhead_fraction": 0.05}, "metrics": []}


def test_summarize_takes_medians_and_needs_a_majority():
    s = summarize([_run(10, 1, 0.5), _run(30, 3, 0.7), _run(20, 2, 0.6)], 0.5)
    assert s["reached"] and s["tta_sim_s"] == 20 and s["tta_wall_s"] == 2 and s["final_accuracy"] == 0.6
    assert s["bytes_moved"] == 6 and s["reached_seeds"] == "3/3"
    s = summarize([_run(10, 1, 0.5), _run(None, None, 0.4), _run(None, None, 0.3)], 0.5)
    assert not s["reached"] and s["tta_sim_s"] is None and s["reached_seeds"] == "1/3"


def test_speedup_is_over_the_fastest_baseline_that_reached():
    r = {"s": {"flux": summarize([_run(10, 2, 0.6)], 0.5), "fmd": summarize([_run(40, 4, 0.6)], 0.5),
               "fmq": summarize([_run(None, None, 0.3)], 0.5), "fmes": summarize([_run(25, 5, 0.5)], 0.5),
               "fedavg": summarize([_run(5, 1, 0.62)], 0.5)}}
    g = speedups(r)["s"]
    assert g["best_baseline"] == "fmes" and g["flux_speedup_sim"] == pytest.approx(2.5)
    assert g["flux_minus_fedavg_final_accuracy"] == pytest.approx(-0.02)


def test_overrides_flatten_nested_tables():
    assert overrides_of({"a": 1, "d": {"name": "x", "n": {"k": True}}}) == ['a=1', 'd.name="x"', 'd.n.k=true']


def test_bench_ci_config_end_to_end(tmp_path):
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, "-m", "flux.cli", "bench", "--config", "benchmarks/tta-ci.toml",
                          "--out", str(out), "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
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
