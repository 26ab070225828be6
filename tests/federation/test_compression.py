"""Compressed transfers (``upload_bits``, ``broadcast_bits``; flux/federation/compression.py):
packed sizes against the quantizer's own layout, the round-trip error bound, the download
ledger's choice between round deltas and a fresh tensor, and the engine's accounting on the tiny
job (fewer bytes both ways, a model within the rounding of the full-precision run)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flux.federation.compression import GROUP_SIZE, compress_deltas, compress_tensor, packed_bytes
from flux.federation.downloads import after_download, changes_since, download_bytes, last_changes

TINY = str(Path(__file__).with_name("tiny.toml"))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 130), (1,), (17,), (2, 1)])
def test_packed_bytes_is_the_quantized_layout(shape, bits):
    from flux.ops import quantize

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert packed_bytes(w.shape, bits) == quantize(w, bits, GROUP_SIZE).nbytes
    assert packed_bytes(w.shape, 0) == w.numel() * 4
    assert packed_bytes(w.shape, 0, element_size=8) == w.numel() * 8


@pytest.mark.parametrize("bits,levels", [(4, 7), (8, 127)])
def test_round_trip_error_is_within_half_a_step(bits, levels):
    w = torch.randn(6, 200, generator=torch.Generator().manual_seed(2)) * 1e-3
    out = compress_tensor(w, bits)
    assert out.shape == w.shape and out.dtype == w.dtype
    groups = torch.nn.functional.pad(w.abs(), (0, 256 - 200)).reshape(6, 4, 64).amax(-1)
    step = (groups / levels).repeat_interleave(64, dim=1)[:, :200]
    assert bool(((out - w).abs() <= step / 2 + 1e-12).all())
    assert not torch.equal(out, w)
    assert compress_tensor(w, 0) is w
    scalar = torch.tensor(0.25, dtype=torch.float64)
    assert compress_tensor(scalar, 8).shape == scalar.shape


def test_compress_deltas_keeps_keys_shapes_and_counts_packed_bytes():
    g = torch.Generator().manual_seed(3)
    experts = {(0, 1): {"gate_up": torch.randn(8, 4, generator=g), "down": torch.randn(4, 4, generator=g)}}
    dense = {"head.weight": torch.randn(3, 4, generator=g)}
    e0, d0, b0 = compress_deltas(experts, dense, 0)
    assert b0 == (32 + 16 + 12) * 4 and e0[(0, 1)]["down"] is experts[(0, 1)]["down"]
    e8, d8, b8 = compress_deltas(experts, dense, 8)
    assert set(e8) == set(experts) and set(d8) == set(dense)
    assert e8[(0, 1)]["gate_up"].shape == (8, 4) and d8["head.weight"].shape == (3, 4)
    assert b8 == 8 * (4 + 4) + 4 * (4 + 4) + 3 * (4 + 4)
    with pytest.raises(ValueError, match="bits"):
        compress_deltas(experts, dense, 3)


# a hand-made ledger: 3 experts of 100 bytes (14 as int-4 copies, 30 per int-8 round delta)
FULL = {(0, 0): 100, (0, 1): 100, (0, 2): 100, "head": 10}
QUANT = {(0, 0): 14, (0, 1): 14, (0, 2): 14}
DELTA = {(0, 0): 30, (0, 1): 30, (0, 2): 30, "head": 4}


def _ledger(holding, trained, changed, r, deltas=DELTA):
    kw = dict(trained=trained, last_change=last_changes(changed, r), delta_sizes=deltas, changed=changed)
    nbytes = download_bytes(holding, full_sizes=FULL, quantized_sizes=QUANT, other_bytes=0, round_idx=r, **kw)
    return nbytes, after_download(holding, r, keys=FULL, quantized_sizes=QUANT, **kw)


def test_round_deltas_replace_a_fetch_while_they_are_cheaper():
    changed: dict = {}
    n0, h = _ledger(None, {(0, 0)}, changed, 0)
    assert n0 == 100 + 14 + 14 + 10  # first sync: tensors, deltas need a copy to apply to
    changed[0] = {(0, 0), "head"}
    changed[1] = {(0, 0)}
    assert changes_since(changed, (0, 0), 0, 2) == 2 and changes_since(changed, (0, 0), 1, 2) == 1
    # two missed deltas of (0, 0) (60 < 100) and one of the head (4 < 10)
    n2, h2 = _ledger(h, {(0, 0)}, changed, 2)
    assert n2 == 60 + 4 and h2[(0, 0)] == (2, True)
    for r in range(2, 6):
        changed[r] = {(0, 0)}
    # four missed deltas (120) cost more than the tensor: fetch it
    n5, h5 = _ledger(h2, {(0, 0)}, changed, 6)
    assert n5 == 100 and h5[(0, 0)] == (6, True)
    # without broadcast deltas the same history fetches whole tensors
    n2_plain, _ = _ledger(h, {(0, 0)}, {0: {(0, 0), "head"}, 1: {(0, 0)}}, 2, deltas=None)
    assert n2_plain == 100 + 10


def test_a_quantized_copy_cannot_take_deltas_but_a_full_one_serves_a_read_only_round():
    changed: dict = {}
    _, h = _ledger(None, {(0, 0)}, changed, 0)  # (0, 1), (0, 2) held as int-4 copies
    changed[0] = {(0, 0), (0, 1)}
    # (0, 1) now trained: its int-4 copy takes no delta, the tensor comes whole; (0, 0) is now
    # read-only and its full copy is brought up to date by one delta (30 > 14: a fresh int-4 copy)
    n, h1 = _ledger(h, {(0, 1)}, changed, 1)
    assert n == 100 + 14 and h1[(0, 1)] == (1, True) and h1[(0, 0)] == (1, False)
    cheap = {**DELTA, (0, 0): 10}
    n_cheap, h1c = _ledger(h, {(0, 1)}, changed, 1, deltas=cheap)
    assert n_cheap == 100 + 10 and h1c[(0, 0)] == (1, True)  # the delta keeps the copy full


def _run(tmp_path, name, *overrides):
    from flux.federation.config import load_config
    from flux.federation.runner import Run

    run = Run(load_config(TINY, ["rounds=3", *overrides]), tmp_path / name, resume=False, progress=False)
    return run, [run.round(r) for r in range(3)]


def _downloads_by_sync(records) -> tuple[int, int]:
    """Bytes down of first syncs and of participants that had synced before."""
    seen, first, again = set(), 0, 0
    for rec in records:
        for pid, b in rec["participant_bytes"].items():
            if pid in seen:
                again += b["down"]
            else:
                first += b["down"]
        seen |= set(rec["participant_bytes"])
    return first, again


@pytest.mark.parametrize("method", ["flux", "fedavg"])
def test_engine_moves_fewer_bytes_and_lands_near_the_full_precision_model(tmp_path, method):
    full, rec_full = _run(tmp_path, "full", f"method={method}")
    comp, rec_comp = _run(tmp_path, "comp", f"method={method}", "upload_bits=8", "broadcast_bits=8")
    up_full, up_comp = sum(r["bytes_up"] for r in rec_full), sum(r["bytes_up"] for r in rec_comp)
    # int8 + one fp32 scale per 64 columns: 1.0625 of 4 bytes (some tensors have < 64 columns)
    assert 0.25 < up_comp / up_full < 0.33
    # a first sync fetches tensors; a participant seen before brings its copy up to date with deltas
    first_full, again_full = _downloads_by_sync(rec_full)
    first_comp, again_comp = _downloads_by_sync(rec_comp)
    assert first_comp == first_full and again_full > 0
    assert 0 < again_comp < 0.6 * again_full
    assert rec_comp[-1]["sim_s"] < rec_full[-1]["sim_s"]
    moved = changed = 0.0
    for name, p in full.work.model.named_parameters():
        q = dict(comp.work.model.named_parameters())[name]
        changed += float((p.detach() - q.detach()).norm())
        moved += float(p.detach().norm())
    assert 0 < changed < 1e-2 * moved


def test_wire_bits_are_validated():
    from flux.federation.config import ConfigError, load_config

    cfg = load_config(None, ["upload_bits=8", "broadcast_bits=4"])
    assert (cfg.upload_bits, cfg.broadcast_bits) == (8, 4)
    for key in ("upload_bits", "broadcast_bits"):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [f"{key}=2"])
