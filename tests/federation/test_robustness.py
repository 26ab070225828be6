"""Issue 13's fault cases on the engine: no pickles on the wire or on disk, poisoned updates
bounded and logged, corrupted checkpoints skipped, a full disk, two runs on one directory."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flux.federation import wire
from flux.federation.update import LocalCosts, Update

TINY = str(Path(__file__).with_name("tiny.toml"))
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flux.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=REPO)


def _update(pid: int = 1, scale: float = 1.0) -> Update:
    g = torch.Generator().manual_seed(pid)
    return Update(participant=pid,
                  expert_deltas={(0, e): {"gate_up": torch.randn(4, 2, generator=g) * scale,
                                          "down": torch.randn(2, 2, generator=g) * scale} for e in range(3)},
                  expert_tokens={(0, e): 10 for e in range(3)}, num_samples=8,
                  costs=LocalCosts(compute_s=1.0, loss=0.5, bytes_up=1, bytes_down=2, peak_memory_bytes=3))


# ---------------------------------------------------------------------------- the wire
class _Bomb:
    """Unpickling this runs code (creates a file): what a pickle-based transport would execute."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_bomb_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    bomb = pickle.dumps([_Bomb(str(marker))])
    for payload in (bomb, wire.MAGIC + bomb, wire.seal({"a": 1})[:12] + bomb):
        with pytest.raises(wire.WireError):
            wire.decode(payload)
        with pytest.raises(wire.WireError):
            wire.unseal(payload)
    assert not marker.exists()


def test_a_header_naming_a_foreign_class_is_refused():
    good = wire.encode(_update())
    header_len = int.from_bytes(good[12:20], "little")
    header = good[20:20 + header_len].replace(b'"cls":"Update"', b'"cls":"os:system"')
    forged = good[:12] + len(header).to_bytes(8, "little") + header + good[20 + header_len:]
    with pytest.raises(wire.WireError, match="not allowed"):
        wire.decode(forged)


def test_updates_round_trip_exactly():
    u = _update()
    u.utilities = {(0, 1): float("nan")}
    back = wire.decode(wire.encode(u))
    assert isinstance(back, Update) and back.participant == 1 and back.costs == u.costs
    assert all(torch.equal(back.expert_deltas[k][n], u.expert_deltas[k][n]) for k in u.expert_deltas
               for n in u.expert_deltas[k])
    assert back.utilities[(0, 1)] != back.utilities[(0, 1)]  # NaN survives


def test_fuzzed_payloads_raise_only_wire_errors():
    """Truncations and byte flips of a real payload: decoded or WireError, nothing else."""
    good = wire.encode([_update(1), _update(2)])
    rnd = random.Random(0)
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(400):
        data = bytearray(good)
        if i % 2:
            data = data[: rnd.randrange(len(data))]
        else:
            for _ in range(rnd.randint(1, 8)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        try:
            wire.decode(bytes(data))
            outcomes["decoded"] += 1
        except wire.WireError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100, outcomes


def _rank_sends(rank: int, world: int, init: str, out: str) -> None:
    """Rank 1 sends a pickle bomb in place of its payload; rank 0 must reject it, name the rank,
    and keep its own update."""
    import torch.distributed as dist

    from flux.federation import distributed as fd
    from flux.federation.aggregate import gather_updates

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init)
    try:
        if rank == 1:
            fd.all_gather_payloads(pickle.dumps([_Bomb(os.path.join(out, "pwned"))]))
        else:
            bad = []
            got = gather_updates([_update(0)], on_bad_rank=lambda r, e: bad.append((r, str(e))))
            Path(out, "rank0.json").write_text(json.dumps({"kept": [u.participant for u in got], "bad": bad}))
    finally:
        dist.destroy_process_group()


def test_a_rank_sending_a_pickle_is_rejected_by_the_others(tmp_path):
    import torch.multiprocessing as mp

    from flux.federation.distributed import free_port

    mp.start_processes(_rank_sends, args=(2, f"tcp://127.0.0.1:{free_port()}", str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["kept"] == [0]
    assert result["bad"] and result["bad"][0][0] == 1 and "pickles are never decoded" in result["bad"][0][1]
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------- poisoning bounds
def test_a_100x_update_is_clipped_and_an_inflated_token_count_capped():
    from flux.federation.robust import bound_updates

    honest = [_update(p) for p in range(3)]
    poisoned = _update(9, scale=100.0)
    poisoned.expert_tokens[(0, 0)] = 10**9
    poisoned.num_samples = 10**6
    updates = honest + [poisoned]
    events = bound_updates(updates, max_delta_rms_ratio=10.0, action="clip", max_samples=16, seq_len=32)
    kinds = {(e["participant"], e["check"], e["action"]) for e in events}
    assert (9, "delta_rms", "clipped") in kinds and (9, "tokens", "capped") in kinds and (9, "samples", "capped") in kinds
    assert all(e["participant"] == 9 for e in events), events  # honest updates untouched
    assert poisoned.expert_tokens[(0, 0)] == 16 * 32 and poisoned.num_samples == 16
    bound = next(e["bound"] for e in events if e["check"] == "delta_rms")
    for d in poisoned.expert_deltas.values():
        rms = (sum(float(t.double().pow(2).sum()) for t in d.values()) / sum(t.numel() for t in d.values())) ** 0.5
        assert rms <= bound * (1 + 1e-6)
    rejected = [_update(p) for p in range(3)] + [_update(9, scale=100.0)]
    events = bound_updates(rejected, max_delta_rms_ratio=10.0, action="reject", max_samples=16, seq_len=32)
    assert not rejected[-1].expert_deltas and all(e["action"] == "rejected" for e in events)


def test_a_poisoned_participant_is_bounded_in_a_real_run(tmp_path, monkeypatch):
    """Participant updates scaled 100x with a huge token claim, in a real in-process run: the
    round's metrics log the clip with its reason, and the run ends finite."""
    import math

    from flux.federation import runner
    from flux.federation.config import load_config

    cfg = load_config(TINY, ["rounds=2", "method=\"fedavg\"", "participants_per_round=4"])
    real = runner.Run.round
    poisoned = []

    def poisoning_round(self, r):
        original = self.method.local_update

        def local_update(ctx, round_idx, pid, plan, profile):
            upd = original(ctx, round_idx, pid, plan, profile)
            if not poisoned or poisoned[0] == pid:
                poisoned[:1] = [pid]
                upd.expert_deltas = {k: {n: t * 100 for n, t in d.items()} for k, d in upd.expert_deltas.items()}
                upd.expert_tokens = {k: 10**9 for k in upd.expert_tokens}
            return upd

        self.method.local_update = local_update
        try:
            return real(self, r)
        finally:
            self.method.local_update = original

    monkeypatch.setattr(runner.Run, "round", poisoning_round)
    out = tmp_path / "p"
    summary = runner.run(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [e for r in rows for e in r["bounded"]]
    assert any(e["participant"] == poisoned[0] and e["check"] == "delta_rms" and e["action"] == "clipped"
               for e in events), events
    assert any(e["check"] == "tokens" and e["action"] == "capped" for e in events)
    assert all(e["participant"] == poisoned[0] for e in events), events
    assert all(math.isfinite(r["loss"]) for r in rows) and summary["final_accuracy"] is not None


# ---------------------------------------------------------------------------- storage faults
def test_a_truncated_latest_checkpoint_resumes_from_the_previous_one(tmp_path):
    full = tmp_path / "full"
    res = run_cli("run", "--config", TINY, "--out", str(full), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    reference = json.loads((full / "summary.json").read_text())["model_sha256"]
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    latest = broken / "checkpoints" / "round-00003.ckpt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    res = run_cli("run", "--resume", str(broken), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "unreadable" in res.stderr and "checksum" in res.stderr, res.stderr[-2000:]
    assert "resumed from round 2" in res.stderr
    assert json.loads((broken / "summary.json").read_text())["model_sha256"] == reference


def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    size_kb = 2500  # one ~1.45 MB checkpoint fits, a second one does not
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs as root and must mount a tmpfs: {res.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        out = mount / "run"
        res = run_cli("run", "--config", TINY, "--out", str(out), "--quiet")
        assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
        assert "disk is full" in res.stderr and "previous checkpoint is intact" in res.stderr, res.stderr[-2000:]
        ckpts = sorted(p.name for p in (out / "checkpoints").glob("round-*.ckpt"))
        assert ckpts == ["round-00001.ckpt"], ckpts
        assert not list((out / "checkpoints").glob(".*.tmp")), "a partial checkpoint was left behind"
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    res = run_cli("run", "--resume", str(moved), "--quiet")
    assert res.returncode == 0 and "resumed from round 1" in res.stderr, res.stderr[-2000:]
    reference = run_cli("run", "--config", TINY, "--out", str(tmp_path / "ref"), "--quiet")
    assert reference.returncode == 0
    assert (json.loads((moved / "summary.json").read_text())["model_sha256"]
            == json.loads((tmp_path / "ref" / "summary.json").read_text())["model_sha256"])


def test_a_second_run_on_a_directory_in_use_refuses(tmp_path):
    from flux.federation.runner import run_directory_lock

    out = tmp_path / "busy"
    with run_directory_lock(out):
        res = run_cli("run", "--config", TINY, "--out", str(out), "--quiet", "--set", "rounds=1")
    assert res.returncode == 1 and "in use by another flux run" in res.stderr and str(os.getpid()) in res.stderr
    assert not (out / "metrics.jsonl").exists()
    res = run_cli("run", "--config", TINY, "--out", str(out), "--quiet", "--set", "rounds=1")
    assert res.returncode == 0, res.stderr[-2000:]  # the lock died with its holder
