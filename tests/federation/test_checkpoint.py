"""flux.federation.checkpoint: atomic saves, LATEST, pruning, corrupt fallback, RNG state."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from flux.federation.checkpoint import checkpoint_path, load_latest, rng_state, save_checkpoint, set_rng_state


def state_of(r: int) -> dict:
    return {"model": {"w": torch.full((3, 2), float(r))}, "next_round": r, "method": {"history": [r] * r}}


def test_save_and_load_latest_round_trips_tensors_and_objects(tmp_path):
    assert load_latest(tmp_path) is None
    path = save_checkpoint(tmp_path, 3, state_of(3))
    assert path == tmp_path / "checkpoints" / "round-00003.ckpt" and path.exists()
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "round-00003.ckpt"
    r, state = load_latest(tmp_path)
    assert r == 3 and state["method"] == {"history": [3, 3, 3]}
    assert torch.equal(state["model"]["w"], torch.full((3, 2), 3.0))


def test_keeps_only_the_newest_and_ignores_temp_files(tmp_path):
    for r in range(1, 6):
        save_checkpoint(tmp_path, r, state_of(r), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["LATEST", "round-00004.ckpt", "round-00005.ckpt"]
    # a writer killed mid-save leaves a temp file: it is never loaded and the next save removes it
    (tmp_path / "checkpoints" / ".round-00006.ckpt.k3j2x9.tmp").write_bytes(b"partial")
    assert load_latest(tmp_path)[0] == 5
    save_checkpoint(tmp_path, 6, state_of(6), keep=2)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_corrupt_latest_falls_back_to_the_previous_one_with_a_warning(tmp_path):
    save_checkpoint(tmp_path, 1, state_of(1))
    save_checkpoint(tmp_path, 2, state_of(2))
    checkpoint_path(tmp_path, 2).write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="round-00002.ckpt is unreadable"):
        r, state = load_latest(tmp_path)
    assert r == 1 and state["next_round"] == 1


def test_latest_pointer_wins_over_stray_newer_files_and_resaving_drops_them(tmp_path):
    save_checkpoint(tmp_path, 1, state_of(1))
    save_checkpoint(tmp_path, 2, state_of(2))
    save_checkpoint(tmp_path, 1, state_of(1))  # a run resumed from round 1 re-does round 2
    assert not checkpoint_path(tmp_path, 2).exists()
    assert load_latest(tmp_path)[0] == 1


def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    """A child process dies (os._exit) right after writing the temp file, before the rename."""
    save_checkpoint(tmp_path, 1, state_of(1))
    script = textwrap.dedent(f"""
        import os, torch
        import flux.federation.checkpoint as ck
        real = os.replace
        def dying_replace(src, dst):
            os._exit(9)
        import flux.data.cache as cache
        cache.os.replace = dying_replace
        ck.save_checkpoint({str(tmp_path)!r}, 2, {{"next_round": 2, "w": torch.ones(1000)}})
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 9, res.stderr
    leftovers = list((tmp_path / "checkpoints").glob(".*.tmp"))
    assert leftovers and leftovers[0].stat().st_size > 0  # the data was written, not renamed
    r, state = load_latest(tmp_path)
    assert r == 1 and state["next_round"] == 1


def test_rng_state_restores_torch_numpy_and_python():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    set_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_rng_state_survives_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    save_checkpoint(tmp_path, 1, {"rng": rng_state()})
    expected = torch.rand(4)
    torch.manual_seed(6)
    set_rng_state(load_latest(tmp_path)[1]["rng"])
    assert torch.equal(torch.rand(4), expected)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, {}, keep=0)
    with pytest.raises(ValueError, match="round_index"):
        save_checkpoint(tmp_path, -1, {})
    assert not os.path.exists(tmp_path / "checkpoints" / "round--0001.ckpt")
