"""Quantized downloads of read-only experts (``download_bits``, flux/federation/downloads.py):
the per-tensor ledger on hand-made histories, the copies FLUX merges from, and the engine's
accounting on the tiny job (fmes: only the clock changes; fedavg: nothing changes)."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from flux.federation.downloads import (GROUP_SIZE, after_download, download_bytes, last_changes,
                                       readonly_copy)

TINY = str(Path(__file__).with_name("tiny.toml"))
FULL = {(0, 0): 100, (0, 1): 100, (0, 2): 100, "head": 10}
QUANT = {(0, 0): 14, (0, 1): 14, (0, 2): 14}


def _bytes(holding, trained, changed, r, other=1000):
    return download_bytes(holding, full_sizes=FULL, quantized_sizes=QUANT, trained=trained,
                          last_change=last_changes(changed, r), other_bytes=other)


def _hold(holding, trained, changed, r):
    return after_download(holding, r, keys=FULL, trained=trained, quantized_sizes=QUANT,
                          last_change=last_changes(changed, r))


def test_first_download_is_full_for_trained_and_quantized_for_the_rest():
    assert _bytes(None, {(0, 0)}, {}, 0) == 1000 + 100 + 14 + 14 + 10
    assert _bytes(None, None, {}, 0) == 1000 + 310  # a method that trains everything


def test_only_changed_tensors_are_fetched_and_at_the_precision_the_round_needs():
    changed = {}
    h = _hold(None, {(0, 0)}, changed, 0)
    assert h[(0, 0)] == (0, True) and h[(0, 1)] == (0, False) and h["head"] == (0, True)
    changed[0] = {(0, 0), "head"}
    # round 2, same roles: the trained expert and the head changed, the read-only ones did not
    assert _bytes(h, {(0, 0)}, changed, 2) == 100 + 10
    # (0, 1) becomes trained: its quantized copy does not serve, although it did not change
    assert _bytes(h, {(0, 1)}, changed, 2) == 100 + 14 + 10  # (0, 0) is now read-only and changed
    h2 = _hold(h, {(0, 1)}, changed, 2)
    assert h2[(0, 1)] == (2, True) and h2[(0, 0)] == (2, False) and h2[(0, 2)] == (0, False)
    # a current full-precision copy serves a read-only round: nothing to fetch
    assert _bytes(h2, {(0, 2)}, changed, 3) == 100  # only (0, 2) at full precision
    h3 = _hold(h2, {(0, 2)}, changed, 3)
    assert h3[(0, 1)] == (2, True)  # kept its full-precision copy
    changed[3] = {(0, 1)}
    assert _bytes(h3, {(0, 2)}, changed, 4) == 14  # (0, 1) changed, fetched read-only


def test_the_copies_match_what_profiling_quantizes():
    """A participant profiles its int-N copy: the copy must be the profiler's own quantization."""
    from flux.ops import quantize
    from flux.profiling import profile_model

    assert inspect.signature(profile_model).parameters["group_size"].default == GROUP_SIZE
    w = torch.randn(3, 40, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(readonly_copy(w, 4), quantize(w, 4, GROUP_SIZE).dequantize())
    assert readonly_copy(w, 0) is w
    err4 = float((readonly_copy(w, 4) - w).norm() / w.norm())
    err8 = float((readonly_copy(w, 8) - w).norm() / w.norm())
    assert 0 < err8 < err4 < 0.2


def test_flux_merges_from_the_copies_it_downloaded(tmp_path):
    """Tuning experts are the originals; every other expert's weights are int-4 copies."""
    from flux.federation.config import load_config
    from flux.federation.runner import Run
    from flux.merging.install import layer_weight_stacks
    from flux.methods.flux import participant_stacks

    run = Run(load_config(TINY, ["rounds=1"]), tmp_path / "r", resume=False, progress=False)
    handle = run.work.handle
    tuning = [[0, 2], []]
    assert participant_stacks(handle, tuning, 0) is None
    copies, originals = participant_stacks(handle, tuning, 4), layer_weight_stacks(handle)
    for l, (c, o) in enumerate(zip(copies, originals)):
        for k in ("gate_up", "down"):
            for e in range(o[k].shape[0]):
                if e in tuning[l]:
                    assert torch.equal(c[k][e], o[k][e])
                else:
                    assert torch.equal(c[k][e], readonly_copy(o[k][e], 4)) and not torch.equal(c[k][e], o[k][e])


def _run(tmp_path, name, *overrides):
    from flux.federation.config import load_config
    from flux.federation.runner import Run

    run = Run(load_config(TINY, ["rounds=3", *overrides]), tmp_path / name, resume=False, progress=False)
    records = [run.round(r) for r in range(3)]
    return run, records


@pytest.mark.parametrize("method", ["fmes", "fedavg"])
def test_engine_accounting(tmp_path, method):
    """fmes only reads its dropped experts: quantized downloads change its clock, never its model;
    fedavg trains every expert: download_bits changes nothing."""
    from flux.federation.runner import model_sha256

    full, rec_full = _run(tmp_path, "full", f"method={method}", "download_bits=0")
    quant, rec_quant = _run(tmp_path, "quant", f"method={method}", "download_bits=4")
    assert model_sha256(full.work.model) == model_sha256(quant.work.model)
    down_full = [r["bytes_down"] for r in rec_full]
    down_quant = [r["bytes_down"] for r in rec_quant]
    if method == "fedavg":
        assert down_quant == down_full
    else:
        assert all(q <= f for q, f in zip(down_quant, down_full)) and sum(down_quant) < sum(down_full)
        assert rec_quant[-1]["sim_s"] < rec_full[-1]["sim_s"]


def test_download_bits_is_validated():
    from flux.federation.config import ConfigError, load_config

    assert load_config(None, ["download_bits=0"]).download_bits == 0
    with pytest.raises(ConfigError, match="download_bits"):
        load_config(None, ["download_bits=3"])
