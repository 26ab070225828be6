"""Each device class's FLUX view of the global model (`flux evaluate RUN_DIR --views`): the view
with nothing merged and nothing quantized is the global model itself, a merged one is not, the
budgets are the ones a run derives, and the global model is untouched afterwards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flux.cli import main
from flux.federation.config import load_config
from flux.federation.views import participant_view_quality, views_text
from flux.federation.workload import build_workload
from flux.models import evaluate

TINY = str(Path(__file__).with_name("tiny.toml"))
HUGE = ('devices.profiles=[{name="huge", memory_bytes=1000000000000, flops=1e13, '
        'host_link_bytes_per_s=1e10, network_bytes_per_s=1e9}]')


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_view_that_merges_and_quantizes_nothing_is_the_global_model():
    # memory for everything, half the experts tuned: every other expert keeps its own group, in
    # full precision, from full-precision downloads
    cfg = load_config(TINY, [HUGE, "flux.max_tune_fraction=0.5", "download_bits=0"])
    work = build_workload(cfg, progress=False)
    result = participant_view_quality(work, cfg, formats=["full"])
    (row,) = result["views"]
    total = sum(layer.num_experts for layer in work.handle.moe_layers)
    assert row["device"] == "huge" and row["tuning"] == total // 2
    assert row["merged_groups"] == row["non_tuning"] == total - total // 2
    assert row["accuracy"] == result["global"]["accuracy"]
    assert row["loss"] == pytest.approx(result["global"]["loss"], rel=1e-6)


def test_merged_views_per_class_and_format_leave_the_global_model_as_it_was():
    from flux.federation.devices import participant_profiles
    from flux.methods.api import RunContext
    from flux.methods.flux import Flux

    cfg = load_config(TINY)
    work = build_workload(cfg, progress=False)
    before, reference = _state(work.model), evaluate(work.model, work.test)
    result = participant_view_quality(work, cfg, formats=["full", "int4"])
    after = work.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result["global"] == reference
    devices = participant_profiles(cfg.devices, cfg.participants, work.model_params)
    method = Flux()  # the budgets a run with full-precision groups derives
    method.setup(RunContext(cfg=load_config(TINY, ["flux.frozen_format=full"]), work=work, devices=devices,
                            rank=0, world=1))
    rows = result["views"]
    assert [(r["frozen_format"], r["device"]) for r in rows] == [
        (f, d) for f in ("full", "int4") for d in ("rtx4090-24gb", "rtx3060-12gb")]
    full_rows = [r for r in rows if r["frozen_format"] == "full"]
    assert [r["tuning"] for r in full_rows] == [method.budgets[r["participant"]].tune for r in full_rows]
    small = full_rows[1]
    assert small["merged_groups"] < small["non_tuning"]  # the small class really merges
    assert small["loss"] != pytest.approx(reference["loss"], rel=1e-6)
    # int4 groups: the budgets of an int4 run (cheaper groups, so more of them), a different view
    int4 = Flux()
    int4.setup(RunContext(cfg=load_config(TINY, ["flux.frozen_format=int4"]), work=work, devices=devices, rank=0,
                          world=1))
    small4 = rows[3]
    assert small4["tuning"] == int4.budgets[1].tune and small4["merged_groups"] > small["merged_groups"]
    assert small4["loss"] != pytest.approx(small["loss"], rel=1e-6)
    text = views_text(result)
    assert f"| global model | - | - | - | {reference['accuracy']:.4f} | {reference['loss']:.4f} |" in text
    assert (f"| rtx3060-12gb (participant 1) | full | {small['tuning']} | {small['merged_groups']} "
            f"({small['non_tuning']}) | {small['accuracy']:.4f} | {small['loss']:.4f} |") in text
    with pytest.raises(ValueError, match="unknown frozen format"):
        participant_view_quality(work, cfg, formats=["int3"])


def test_flux_evaluate_views_prints_and_saves_the_table(tmp_path, capsys):
    from flux.federation.runner import run

    out = tmp_path / "run"
    run(load_config(TINY, ["rounds=1"]), out, progress=False)
    assert main(["evaluate", str(out), "--quiet", "--views", "full,int8", "--json", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    assert "What each device class trains in" in printed and "| rtx3060-12gb (participant 1) | int8 |" in printed
    saved = json.loads((tmp_path / "e.json").read_text())
    assert [r["frozen_format"] for r in saved["views"]] == ["full", "full", "int8", "int8"]
    assert main(["evaluate", str(out), "--quiet", "--views"]) == 0  # the run's own format
    assert "| rtx4090-24gb (participant 0) | int4 |" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--quiet", "--views", "full,int3"]) == 2
    assert "unknown frozen format(s) int3 for --views" in capsys.readouterr().err
