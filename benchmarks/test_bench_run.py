"""The runner (python -m benchmarks.run): a tiny run writes the JSON and the table; the targets
and the README update work on synthetic input.  No timings are asserted."""
from __future__ import annotations

import json

import pytest

from benchmarks import run


def test_runner_writes_json_and_table(tmp_path, capsys):
    rc = run.main([
        "--shapes", "deepseek-moe-cpu", "--routings", "merged", "--passes", "fwd",
        "--gates", "int4-g64", "--providers", "grouped_mm,floor,unfused,flux:reference,flux:cpp",
        "--budget", "0", "--min-reps", "1", "--max-reps", "1", "--no-ceilings", "--out", str(tmp_path),
    ])
    assert rc == 0
    report = json.loads((tmp_path / "kernels-cpu.json").read_text())
    for key in ("cpu_model", "cpu_cores", "torch_threads"):
        assert key in report["machine"]
    for key in ("torch", "triton", "flux", "python"):
        assert key in report["versions"]
    assert set(report["shapes"]) == {"deepseek-moe-cpu"}
    rows = {(r["shape"], r.get("routing") or r.get("gate"), r["pass"], r["provider"]): r for r in report["results"]}
    gmm = rows[("deepseek-moe-cpu", "merged", "fwd", "grouped_mm")]
    assert gmm["reps"] == 1 and gmm["gflops"] > 0 and gmm["vs_grouped_mm"] == pytest.approx(1.0)
    ref = rows[("deepseek-moe-cpu", "merged", "fwd", "flux:reference")]
    assert ref["check"] < 1e-3 and ref["vs_floor"] > 0
    route = rows[("deepseek-moe-cpu", "int4-g64", "fwd", "flux:reference")]
    assert route["gbps"] > 0 and route["vs_unfused"] > 0
    table = (tmp_path / "kernels-cpu.md").read_text()
    assert "| deepseek-moe-cpu | merged | fwd | grouped_mm |" in table
    assert table in capsys.readouterr().out


def _row(kind, shape, variant, provider, median_ms):
    key = "routing" if kind == "moe" else "gate"
    return {"kind": kind, "shape": shape, key: variant, "pass": "fwd+bwd" if kind == "moe" else "fwd",
            "provider": provider, "median_ms": median_ms, "reps": 3, "error": None}


def test_targets_are_ratios_of_one_run():
    rows = [
        _row("moe", "olmoe-cpu", "uniform", "flux:cpp", 400.0),
        _row("moe", "olmoe-cpu", "merged", "flux:cpp", 300.0),
        _row("route", "olmoe-cpu", "int4-g64", "flux:cpp", 10.0),
    ]
    rows[0].update(vs_grouped_mm=650 / 400, vs_floor=400 / 340, vs_grouped_mm_min=1.5, vs_floor_min=1.1)
    rows[1].update(vs_grouped_mm=500 / 300, vs_grouped_mm_min=1.7, vs_floor_min=0.5)
    rows[2].update(vs_unfused=2.0, vs_unfused_min=1.9)
    targets = run.evaluate_targets(rows, "cpu")
    assert [t["ok"] for t in targets] == [True, True, False, True, None]
    assert [t["value_from_min_times"] for t in targets] == [1.5, 1.1, 1.7, 1.9, None]
    assert run.evaluate_targets(rows, "cuda") == []


def test_update_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Kernel benchmarks (CPU)\n\nBENCHMARK_TABLE_PLACEHOLDER\n\n## Tests\n")
    run.update_readme(readme, "| a |\n|---|\n")
    first = readme.read_text()
    assert "BENCHMARK_TABLE_PLACEHOLDER" not in first and "| a |" in first and first.endswith("## Tests\n")
    run.update_readme(readme, "| b |\n|---|\n")
    second = readme.read_text()
    assert "| a |" not in second and "| b |" in second and second.count(run.README_BEGIN) == 1


def test_cuda_table_reports_fraction_of_ceilings():
    moe = _row("moe", "olmoe", "uniform", "flux:auto", 10.0)
    moe.update(gflops=400_000.0, vs_grouped_mm=1.5, vs_floor=1.1, dtype="bfloat16")
    route = _row("route", "olmoe", "int4-g64", "flux:cuda", 0.1)
    route.update(gbps=1500.0, gflops=100.0, vs_unfused=3.0, dtype="bfloat16")
    ceil = {"matmul": {"n": 8192, "dtype": "bfloat16", "gflops": 800_000.0}, "copy": {"gbps": 3000.0}}
    table = run.markdown_table([moe, route], ceil, "cuda")
    assert "% of ceiling" in table
    assert "400.0 TFLOP/s" in table and "50% of matmul" in table
    assert "1500.00 GB/s" in table and "50% of copy" in table
