"""`flux ablate` end to end on a tiny model: every claim is measured and written, and the
measurements that must hold whatever the model (fused == per-layer K-Means, int8 profiles closer
than int4, errors in range) do."""
from __future__ import annotations

import json

import pytest

from flux.ablation import ablation_table, kmeans_speedup, run_ablation


def test_kmeans_speedup_checks_identical_clusters():
    r = kmeans_speedup(5, 12, 3, seed=1)
    assert r["identical_clusters"] and r["fused_s"] > 0 and r["per_layer_s"] > 0 and r["layers"] == 5


def test_ablation_writes_every_claim(tmp_path):
    tiny = {"preset": "mixtral-tiny", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2}
    r = run_ablation(tmp_path, preset=tiny, pretrain_steps=10, examples=48, seq_len=32, zo_perturbations=(2, 4),
                     progress=False)
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["profiling_error"] == pytest.approx(r["profiling_error"])
    for key in ("profiling_error", "stale_profiling_error", "merge_output_error", "merge_weighting_error",
                "fused_kmeans_speedup", "zo_cosine_distance", "overhead_fraction"):
        assert key in saved, key
    assert set(saved["profiling_error"]) == {"int4", "int8"}
    assert 0 <= saved["profiling_error"]["int8"] <= saved["profiling_error"]["int4"] < 1
    assert set(saved["merge_output_error"]) == {"adaptive", "uniform", "single", "drop", "adaptive_weighted"}
    assert all(0 < v < 10 for v in saved["merge_output_error"].values())
    assert set(saved["merge_weighting_error"]) == {"freq_attn", "freq", "avg"}
    assert saved["fused_kmeans"]["deepseek_moe_16b_shape"]["identical_clusters"]
    assert 0 <= saved["zo_cosine_distance"] <= 2 and set(saved["zo_cosine_distance_by_perturbations"]) == {"2", "4"}
    assert 0 < saved["overhead_fraction"] < 1
    # 48 local examples: n = 32 is a sample, 64 and 128 profile all of them (the int4 error)
    sampled = saved["sampled_profiling_error"]
    assert set(sampled) == {"32", "64", "128"} and all(0 <= v < 1 for v in sampled.values())
    assert sampled["64"] == sampled["128"] == pytest.approx(saved["profiling_error"]["int4"])
    assert "| claim |" in (tmp_path / "ablation.md").read_text() == ablation_table(saved)
