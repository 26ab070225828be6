"""log.tensorboard = true: every round's numbers as TensorBoard scalars, equal to metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY = str(Path(__file__).with_name("tiny.toml"))


def test_tensorboard_scalars_match_the_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="requirements/dev.txt installs tensorboard; CI runs this")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flux.federation.config import load_config
    from flux.federation.runner import run

    out = tmp_path / "tb"
    run(load_config(TINY, ["rounds=2", "log.tensorboard=true"]), out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"round/accuracy", "round/sim_s", "round/round_sim_s", "accuracy_vs_sim_s/accuracy"} <= tags, tags
    got = {e.step: e.value for e in acc.Scalars("round/accuracy")}
    assert got == pytest.approx({r["round"]: r["accuracy"] for r in rows}, rel=1e-6)
    sim = [e.step for e in acc.Scalars("accuracy_vs_sim_s/accuracy")]
    assert sim == [int(round(1000 * r["sim_s"])) for r in rows]


def test_tensorboard_off_by_default_writes_nothing(tmp_path):
    from flux.federation.config import load_config
    from flux.federation.runner import run

    out = tmp_path / "plain"
    run(load_config(TINY, ["rounds=1"]), out, progress=False)
    assert not (out / "tensorboard").exists()
