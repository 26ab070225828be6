"""FLUX's measured budget policy (``flux.budget_policy = "measured"``): each participant tries the
splits of CANDIDATE_SHARES on its own data and keeps the most tuning experts whose merged view is
within tolerance; the measurement leaves the model as it was, an unmerged split measures exactly
0, the tolerance moves the choice, the time is charged to the first round, a resume keeps the
splits the run started with."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flux.federation.config import load_config
from flux.federation.devices import participant_profiles
from flux.federation.workload import build_workload
from flux.methods.api import RunContext
from flux.methods.budget_policy import BudgetTrial, choose, relative_error
from flux.methods.flux import Flux

TINY = str(Path(__file__).parents[1] / "federation" / "tiny.toml")


@pytest.fixture(scope="module")
def work():
    return build_workload(load_config(TINY), progress=False)


def _setup(work, *overrides: str) -> tuple[Flux, RunContext]:
    # full-precision groups: on the tiny model int4 ones are cheap enough that nothing merges
    cfg = load_config(TINY, ["flux.budget_policy=measured", "flux.frozen_format=full", *overrides])
    ctx = RunContext(cfg=cfg, work=work, devices=participant_profiles(cfg.devices, cfg.participants,
                                                                       work.model_params), rank=0, world=1)
    method = Flux()
    method.setup(ctx)
    return method, ctx


def _total_experts(work) -> int:
    return sum(layer.num_experts for layer in work.handle.moe_layers)


def test_choose_takes_the_most_tuning_experts_within_tolerance():
    trials = [BudgetTrial(0.0, 7, 17, 0.12), BudgetTrial(0.25, 6, 20, 0.08), BudgetTrial(0.5, 6, 22, 0.05),
              BudgetTrial(1.0, 5, 27, 0.0)]
    assert choose(trials, 0.1) == 2  # 6 tuning experts; of the two, the one with more groups
    assert choose(trials, 0.12) == 0
    assert choose(trials, 0.0) == 3
    far = [BudgetTrial(0.0, 7, 17, 0.5), BudgetTrial(0.5, 6, 22, 0.3), BudgetTrial(1.0, 5, 25, 0.4)]
    assert choose(far, 0.1) == 1  # none within: the smallest error
    with pytest.raises(ValueError, match="no budget trials"):
        choose([], 0.1)


def test_relative_error_is_the_normalised_distance():
    ref = torch.tensor([[3.0, 4.0]])
    assert relative_error(ref.clone(), ref) == 0.0
    assert relative_error(torch.tensor([[3.0, 4.5]]), ref) == pytest.approx(0.1)
    assert relative_error(torch.zeros(1, 2), torch.zeros(1, 2)) == 0.0


def test_measuring_leaves_the_model_and_an_unmerged_split_measures_zero(work):
    before = {k: v.detach().clone() for k, v in work.model.state_dict().items()}
    method, ctx = _setup(work)
    after = work.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    total = _total_experts(work)
    merging_seen = False
    for pid in range(len(ctx.devices)):
        trials = method.budget_trials[pid]
        splits = [(t.tune, t.merged) for t in trials]
        assert len(set(splits)) == len(splits) >= 1  # a split two shares give is measured once
        for t in trials:
            if t.tune + t.merged >= total:  # a group per non-tuning expert: the reference itself
                assert t.error == 0.0
            merging_seen |= t.error > 0.0  # (merging experts the sample never routes to changes nothing)
        pick = trials[choose(trials, ctx.cfg.flux.view_error_tolerance)]
        assert (method.budgets[pid].tune, method.budgets[pid].merged) == (pick.tune, pick.merged)
    assert merging_seen  # the small class has a split that merges: the choice is a real one
    assert set(method.uncharged_setup_s) == set(range(len(ctx.devices)))
    assert all(s > 0 for s in method.uncharged_setup_s.values())
    lines = method.setup_lines(ctx)
    assert len(lines) == len(ctx.devices) and "view error per split" in lines[1]


def test_the_tolerance_moves_the_split(work):
    exact, ctx = _setup(work, "flux.view_error_tolerance=0.0")
    loose, _ = _setup(work, "flux.view_error_tolerance=1000.0")
    tuning_first, share_ctx = _setup(work, "flux.budget_policy=share", "flux.min_group_share=0.0")
    assert not tuning_first.budget_trials  # the share policy measures nothing
    (line,) = tuning_first.setup_lines(share_ctx)  # one line per device class instead
    b0, b1 = tuning_first.budgets[0], tuning_first.budgets[1]
    assert line == (f"budgets (share, min_group_share 0.0): rtx4090-24gb: {b0.tune} tuning experts + {b0.merged} "
                    f"merged groups; rtx3060-12gb: {b1.tune} tuning experts + {b1.merged} merged groups")
    moved = False
    for pid in range(len(ctx.devices)):
        trials = exact.budget_trials[pid]
        zero = [t for t in trials if t.error == 0.0]
        chosen = next(t for t in trials if (t.tune, t.merged) == (exact.budgets[pid].tune, exact.budgets[pid].merged))
        if zero:  # tolerance 0: nothing merged that matters
            assert chosen.tune == max(t.tune for t in zero)
        else:  # the memory cannot hold a group per expert: the smallest error
            assert chosen.error == min(t.error for t in trials)
        assert loose.budgets[pid].tune == max(t.tune for t in trials) == tuning_first.budgets[pid].tune
        moved |= exact.budgets[pid].tune < loose.budgets[pid].tune
    assert moved


def test_a_resume_keeps_the_splits_it_started_with(work):
    method, ctx = _setup(work)
    small = 1  # the 12 GB class: more than one candidate split
    other = next(b for b in method.budget_candidates[small]
                 if (b.tune, b.merged) != (method.budgets[small].tune, method.budgets[small].merged))
    state = method.state_dict()
    state["splits"][small] = [other.tune, other.merged]
    state["uncharged_setup_s"] = {small: 1.5}
    resumed, _ = _setup(work)
    resumed.load_state_dict(state)
    assert (resumed.budgets[small].tune, resumed.budgets[small].merged) == (other.tune, other.merged)
    assert resumed.uncharged_setup_s == {small: 1.5}
    assert resumed.budgets[0] is method.budgets[0] or resumed.budgets[0].tune == method.budgets[0].tune


def test_a_run_charges_the_measurement_to_each_participants_first_round(tmp_path):
    from flux.cli import main
    from flux.federation.runner import sample_participants

    out = tmp_path / "run"
    assert main(["run", "--config", TINY, "--out", str(out), "--quiet", "--set", "rounds=2",
                 "--set", "flux.budget_policy=measured", "--set", "flux.frozen_format=full"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    report = summary["method_report"]
    cfg = load_config(str(out / "config.toml"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen: set[int] = set()
    for rec in records:
        sampled = sample_participants(cfg, rec["round"] - 1)  # records count rounds from 1
        first = [p for p in sampled if p not in seen]
        seen.update(sampled)
        owed = sum(report["budget_policy_s"][str(p)] for p in first)
        assert rec["overhead_s"] >= owed - 1e-3  # the measurement is on the participants' clock
    for pid, b in report["budgets"].items():
        assert b["trials"] and any((t["tune"], t["merged"]) == (b["tune"], b["merged"]) for t in b["trials"])
    from flux.federation.checkpoint import load_latest

    _, state = load_latest(out)
    assert set(state["method"]["uncharged_setup_s"]) == set(range(cfg.participants)) - seen
    # `flux evaluate --views` shows the views of the splits the run measured at setup
    from flux.federation.reload import evaluate_run

    views = evaluate_run(out, views=[])["views"]
    assert [r["participant"] for r in views] == [0, 1]
    for r in views:
        assert r["tuning"] == report["budgets"][str(r["participant"])]["tune"]


def test_two_ranks_measure_their_shares_and_agree_with_one_process(tmp_path):
    from tests.federation.test_engine import run_cli, summary

    flags = ["--set", "rounds=1", "--set", "flux.budget_policy=measured", "--set", "flux.frozen_format=full",
             "--quiet"]
    one, two = tmp_path / "w1", tmp_path / "w2"
    for out, extra in ((one, []), (two, ["--nproc", "2"])):
        res = run_cli("run", "--config", TINY, "--out", str(out), *extra, *flags)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stderr.count("measured):") == 4  # every participant's split, printed once
    a, b = summary(one)["method_report"], summary(two)["method_report"]
    assert summary(two)["world_size"] == 2
    assert {p: (x["tune"], x["merged"]) for p, x in a["budgets"].items()} == \
        {p: (x["tune"], x["merged"]) for p, x in b["budgets"].items()}
    for p in a["budgets"]:  # the same splits tried, the same errors up to summation order
        ea = [(t["tune"], t["merged"], t["error"]) for t in a["budgets"][p]["trials"]]
        eb = [(t["tune"], t["merged"], t["error"]) for t in b["budgets"][p]["trials"]]
        assert [x[:2] for x in ea] == [x[:2] for x in eb]
        assert [x[2] for x in ea] == pytest.approx([x[2] for x in eb], rel=1e-4, abs=1e-6)
    assert summary(two)["model_sha256"] == summary(one)["model_sha256"]
