"""`flux evaluate RUN_DIR`: a finished run's newest checkpoint scored again on the run's own
held-out data gives the numbers the run logged at its last evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux.cli import main
from flux.federation.cli import evaluation_text
from flux.federation.config import load_config
from flux.federation.reload import evaluate_run

TINY = str(Path(__file__).with_name("tiny.toml"))


def test_evaluating_a_finished_run_reproduces_its_last_logged_metrics(tmp_path, capsys):
    from flux.federation.runner import run

    out = tmp_path / "run"
    run(load_config(TINY, ["rounds=2", "eval_every=1"]), out, progress=False)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    result = evaluate_run(out)
    assert result["round"] == 2 and result["task"] == "classification" and result["test_examples"] > 0
    assert result["accuracy"] == pytest.approx(last["accuracy"], abs=1e-9)
    assert result["loss"] == pytest.approx(last["loss"], rel=1e-6)
    assert main(["evaluate", str(out), "--quiet", "--json", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert f"after round 2 (classification, {result['test_examples']} held-out examples): accuracy" in printed
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == pytest.approx(result["accuracy"])


def test_the_report_has_a_row_per_task_for_multiple_choice():
    result = {"round": 5, "task": "instruction", "test_examples": 4, "accuracy": 0.5, "loss": 1.25,
              "accuracy_per_task": {"a": 0.25, "b": 0.75}, "loss_per_task": {"a": 2.0, "b": 0.5}}
    text = evaluation_text(result, "runs/x")
    assert text.splitlines()[0] == ("runs/x after round 5 (instruction, 4 held-out examples): "
                                    "accuracy 0.5000, loss 1.2500")
    assert "| a | 0.250 | 2.000 |" in text and "| b | 0.750 | 0.500 |" in text


def test_a_directory_that_is_not_a_run_or_has_no_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--quiet"]) == 1
    assert "has no config.toml: not a flux run directory" in capsys.readouterr().err
    (tmp_path / "config.toml").write_text(Path(TINY).read_text())
    assert main(["evaluate", str(tmp_path), "--quiet"]) == 1
    assert "has no readable checkpoint" in capsys.readouterr().err
