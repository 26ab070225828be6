"""End-to-end engine tests on the tiny job (tests/federation/tiny.toml): process layouts give the
same weights, resume after a kill gives the same hash, faults never hang or poison a round."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = str(Path(__file__).with_name("tiny.toml"))
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def flux_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flux.cli", *args]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(flux_cmd(*args), capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The tiny job, one process, no process group (also warms the tokenizer/pretrain cache)."""
    out = tmp_path_factory.mktemp("w1")
    res = run_cli("run", "--config", TINY, "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_the_flux_command_is_installed():
    """The README's main command is `flux run`: the console script must be on PATH after install."""
    import shutil

    exe = shutil.which("flux")
    assert exe, "the `flux` console script is not on PATH (pip install -e . installs it)"
    res = subprocess.run([exe, "run", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--nproc" in res.stdout and "--resume" in res.stdout


def test_single_process_writes_every_output(single):
    s = summary(single)
    assert s["method"] == "flux" and s["rounds"] == 3 and s["world_size"] == 1
    for name in ("config.toml", "metrics.jsonl", "summary.json", "accuracy.png", "table.md"):
        assert (single / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("wall_s", "sim_s", "accuracy", "loss", "participants", "dropped", "bytes_up", "bytes_down",
                    "peak_memory_bytes", "profile_visible_s"):
            assert key in r, key
        assert 0 <= r["profile_visible_s"] <= r["round_sim_s"]
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["bytes_up"] > 0 and r["bytes_down"] > r["bytes_up"]  # merged experts never go up
        # the per-participant breakdown adds up to the round's totals, and no participant's
        # transfers + compute outlast the round (profiling may be hidden by staleness)
        assert set(r["participant_s"]) == set(r["participant_bytes"]) == {str(p) for p in r["participants"]}
        assert sum(b["up"] for b in r["participant_bytes"].values()) == r["bytes_up"]
        assert sum(b["down"] for b in r["participant_bytes"].values()) == r["bytes_down"]
        for t in r["participant_s"].values():
            assert min(t.values()) >= 0 and t["download"] > 0 and t["upload"] > 0
            assert t["download"] + t["compute"] + t["offload"] + t["upload"] <= r["round_sim_s"] + 1e-2
    assert rows[-1]["sim_s"] > rows[0]["sim_s"] > 0
    assert set(s) >= {"method", "target", "time_to_accuracy", "final_accuracy", "rounds", "model_sha256"}
    # the pretrained point every curve starts from, with the floor of an input-blind predictor
    base = json.loads((single / "base.json").read_text())
    assert 0.0 <= base["accuracy"] <= 1.0 and 0.0 < base["majority_accuracy"] <= 1.0


def test_two_spawned_ranks_give_identical_weights(single, tmp_path):
    out = tmp_path / "w2"
    res = run_cli("run", "--config", TINY, "--out", str(out), "--nproc", "2", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary(out)["world_size"] == 2
    assert summary(out)["model_sha256"] == summary(single)["model_sha256"]


def test_torchrun_two_ranks(single, tmp_path):
    out = tmp_path / "tr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "flux.cli", "run", "--config", TINY, "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary(out)["world_size"] == 2
    assert summary(out)["model_sha256"] == summary(single)["model_sha256"]


def test_resume_after_kill_gives_the_same_hash(single, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(flux_cmd("run", "--config", TINY, "--out", str(out), "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=REPO)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        # a finished checkpoint file, not just its directory (made before the first file is renamed in)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 1 and any((out / "checkpoints").glob("round-*.ckpt")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "summary.json").exists()
    res = run_cli("run", "--resume", str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from round" in res.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert summary(out)["model_sha256"] == summary(single)["model_sha256"]


def test_a_simulated_time_budget_ends_the_run_after_the_round_that_spends_it(single, tmp_path):
    # a budget the first round spends: one round, evaluated as the last one (eval_every = 5)
    out = tmp_path / "budget"
    res = run_cli("run", "--config", TINY, "--set", "sim_budget_s=1e-6", "--set", "eval_every=5",
                  "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["accuracy"] is not None
    assert summary(out)["rounds"] == 1 and (out / "checkpoints").exists()
    # a budget the run never reaches changes nothing: the same weights as without one
    out = tmp_path / "roomy"
    res = run_cli("run", "--config", TINY, "--set", "sim_budget_s=1e12", "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary(out)["rounds"] == 3 and summary(out)["model_sha256"] == summary(single)["model_sha256"]


def test_bad_config_exits_2_naming_the_key(tmp_path):
    res = run_cli("run", "--config", TINY, "--set", "roundz=3", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "roundz" in res.stderr
    res = run_cli("run", "--config", TINY, "--set", "dataset.alpha=\"high\"", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "dataset.alpha" in res.stderr
    res = run_cli("run", "--config", TINY, "--set", "participants_per_round=9", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "participants_per_round" in res.stderr
    # impossible memory budget: only known once the model is built
    res = run_cli("run", "--config", TINY, "--set", 'devices.profiles=[{name="tiny", memory_bytes=1000, '
                  'flops=1e12, host_link_bytes_per_s=1e9, network_bytes_per_s=1e8}]', "--out", str(tmp_path / "y"),
                  "--quiet")
    assert res.returncode == 2 and "devices" in res.stderr, res.stderr[-2000:]


def test_rank_death_does_not_hang(tmp_path):
    """Rank 1 is killed mid-run (torchrun-style ranks, no launcher to clean up): rank 0 must exit
    with a clear error well within the timeout instead of waiting forever."""
    from flux.federation.distributed import free_port

    out = tmp_path / "dead"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = _env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            flux_cmd("run", "--config", TINY, "--out", str(out), "--quiet", "--set", "faults.rank_timeout_s=30",
                     "--set", "rounds=20"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
        time.sleep(0.2)
    procs[1].kill()
    t = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        procs[0].kill()
    assert procs[0].returncode not in (0, None)
    assert time.time() - t < 100
    assert "rank" in err.lower(), err[-2000:]


def test_nan_update_is_rejected_and_dropout_never_hangs(single, tmp_path, monkeypatch):
    """In-process run: participant 1's update carries a NaN (rejected, logged, never aggregated);
    half of the participants drop out (the round still ends)."""
    from flux.federation.config import load_config
    from flux.federation import runner

    cfg = load_config(TINY, ["rounds=2", "faults.dropout=0.5", "participants_per_round=4"])
    real = runner.Run.round
    poisoned = []

    def poisoning_round(self, r):
        method = self.method
        original = method.local_update

        def local_update(ctx, round_idx, pid, plan, profile):
            upd = original(ctx, round_idx, pid, plan, profile)
            if upd.expert_deltas and not poisoned:
                key = next(iter(upd.expert_deltas))
                upd.expert_deltas[key]["down"][0, 0] = float("nan")
                poisoned.append(pid)
            return upd

        method.local_update = local_update
        try:
            return real(self, r)
        finally:
            method.local_update = original

    monkeypatch.setattr(runner.Run, "round", poisoning_round)
    out = tmp_path / "faults"
    s = runner.run(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert poisoned, "no update was poisoned"
    rejected = [x for r in rows for x in r["rejected"]]
    assert any(x["participant"] == poisoned[0] and "finite" in x["reason"].lower() for x in rejected), rejected
    dropped = [set(r["dropped"]) for r in rows]
    assert any(d - {poisoned[0]} for d in dropped), "dropout=0.5 dropped nobody in 8 draws"
    assert all(math.isfinite(r["loss"]) for r in rows), "a NaN reached the global model"
    assert s["final_accuracy"] is not None
    assert len(rows) == 2


@pytest.mark.parametrize("clustering", ["kmeans", "weighted"])
def test_flux_update_carries_the_trained_tuning_experts(tmp_path, clustering, monkeypatch):
    """The uploaded delta of a tuning expert is its trained weights minus the ORIGINAL weights
    (not minus the view's current weights, which would upload zeros), and only tuning experts
    are uploaded; under either merge clustering (flux.merge_clustering)."""
    import flux.merging.install as install
    from flux.federation.config import load_config
    from flux.federation.runner import Run, sample_participants

    used = []
    real_plan = install.plan_model_merge
    monkeypatch.setattr(install, "plan_model_merge",
                        lambda *a, **kw: used.append(kw["clustering"]) or real_plan(*a, **kw))
    cfg = load_config(TINY, ["rounds=1", f"flux.merge_clustering={clustering}"])
    run = Run(cfg, tmp_path / "u", resume=False, progress=False)
    sampled = sample_participants(cfg, 0)
    profiles = {p: run._profile_now(p, 0) for p in sampled}
    roles = run.method.plan(run.ctx, 0, sampled, profiles)
    pid = sampled[0]
    before = {k: v.clone() for k, v in run.work.model.state_dict().items()}
    update = run.method.local_update(run.ctx, 0, pid, roles[pid], profiles[pid])
    tuned = {(l, int(e)) for l, t in enumerate(roles[pid].tuning) for e in t}
    assert update.expert_deltas and set(update.expert_deltas) <= tuned
    assert all(sum(float(t.norm()) for t in d.values()) > 0 for d in update.expert_deltas.values())
    after = run.work.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the global model must stay untouched"
    assert used == [clustering]


def test_sampled_profiles_keep_local_rows_and_still_measure_utilities(tmp_path):
    """flux.profile_samples = 8: the profile covers 8 local samples (rows indexed by local
    position, the others zero) and the Eq. 3 utilities are still measured from it."""
    from flux.federation.config import load_config
    from flux.federation.runner import Run, sample_participants

    cfg = load_config(TINY, ["rounds=1", "flux.profile_samples=8"])
    run = Run(cfg, tmp_path / "s", resume=False, progress=False)
    sampled = sample_participants(cfg, 0)
    profiles = {p: run._profile_now(p, 0) for p in sampled}
    pid = sampled[0]
    prof, n = profiles[pid], len(run.work.train[pid])
    assert len(prof.indices) == 8 < n and prof.layers[0].sample_tokens.shape[0] == n
    rest = torch.ones(n, dtype=torch.bool)
    rest[prof.indices] = False
    assert all(int(layer.sample_tokens[rest].sum()) == 0 for layer in prof.layers)
    assert torch.equal(run._profile_now(pid, 0).indices, prof.indices)  # seeded by (seed, round, pid)
    roles = run.method.plan(run.ctx, 0, sampled, profiles)
    update = run.method.local_update(run.ctx, 0, pid, roles[pid], prof)
    assert update.utilities and all(math.isfinite(v) and v >= 0 for v in update.utilities.values())
    assert any(v > 0 for v in update.utilities.values())
