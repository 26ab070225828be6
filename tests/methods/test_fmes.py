"""FMES: the most-activated experts that fit are kept, exactly the others are dropped."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flux.methods.fmes import FMES, kept_bytes, select_experts
from tests.methods import EXPERTS, LAYERS, global_experts, tiny_context


def _profile(freqs):
    return SimpleNamespace(frequencies=lambda: [f.clone() for f in freqs], seconds=0.25)


FREQS = [torch.tensor([0.05, 0.30, 0.05, 0.00, 0.20, 0.10, 0.25, 0.05], dtype=torch.float64),
         torch.tensor([0.10, 0.10, 0.40, 0.10, 0.00, 0.15, 0.10, 0.05], dtype=torch.float64)]


def test_selection_ranks_by_frequency_within_the_budget():
    ctx, work = tiny_context()
    dense = list(work.model.head.parameters())
    # ranking: (1,2) .40, (0,1) .30, (0,6) .25, (0,4) .20, (1,5) .15, then the .10 tie: (0,5)
    # before (1,0) (shallower layer first), (1,1) ...
    memory = kept_bytes(work.handle, [3, 3], dense)  # 6 experts' worth
    keep = select_experts(work.handle, FREQS, memory, dense)
    assert keep == [[1, 4, 5, 6], [2, 5]]
    assert kept_bytes(work.handle, [len(k) for k in keep], dense) <= memory
    # one byte less: the sixth expert no longer fits
    assert select_experts(work.handle, FREQS, memory - 1, dense) == [[1, 4, 6], [2, 5]]
    # within a layer a tie goes to the lower id: of the .10 experts 0, 1, 3, 6 of layer 1, two fit
    assert select_experts(work.handle, FREQS, kept_bytes(work.handle, [4, 4], dense), dense) == [
        [1, 4, 5, 6], [0, 1, 2, 5]]
    # at least one per layer even when a layer's experts rank low
    low = [FREQS[0], torch.zeros(EXPERTS, dtype=torch.float64)]
    assert select_experts(work.handle, low, kept_bytes(work.handle, [1, 1], dense), dense) == [[1], [0]]


def test_too_little_memory_and_bad_frequencies_raise():
    ctx, work = tiny_context()
    dense = list(work.model.head.parameters())
    floor = kept_bytes(work.handle, [1] * LAYERS, dense)
    with pytest.raises(ValueError, match=str(floor)):
        select_experts(work.handle, FREQS, floor - 1, dense)
    with pytest.raises(ValueError, match="frequencies"):
        select_experts(work.handle, FREQS[:1], floor, dense)
    ctx.devices[0].memory_bytes = floor - 1
    with pytest.raises(ValueError, match="participants \\[0\\]"):
        FMES().setup(ctx)


def test_local_update_drops_exactly_the_experts_outside_the_budget(monkeypatch):
    torch.set_num_threads(1)
    ctx, work = tiny_context(steps=3)
    dense = list(work.model.head.parameters())
    ctx.devices[0].memory_bytes = kept_bytes(work.handle, [3, 3], dense)
    before = global_experts(work.handle)
    seen = {}
    method = FMES()
    original_train = FMES.train

    def spy(self, ctx_, round_idx, pid, params, **kw):
        seen["groups"] = [list(layer.view.expert_to_group) for layer in work.handle.moe_layers]
        return original_train(self, ctx_, round_idx, pid, params, **kw)

    monkeypatch.setattr(FMES, "train", spy)
    method.setup(ctx)
    up = method.local_update(ctx, 0, 0, None, _profile(FREQS))
    kept = [[1, 4, 5, 6], [2, 5]]
    assert method.last_kept[0] == kept
    for l, groups in enumerate(seen["groups"]):
        dropped = [e for e, g in enumerate(groups) if g == -1]
        assert dropped == [e for e in range(EXPERTS) if e not in kept[l]]
    assert up.costs.peak_memory_bytes <= ctx.devices[0].memory_bytes
    assert up.costs.profile_s == 0.25
    assert set(up.expert_deltas) <= {(l, e) for l in range(LAYERS) for e in kept[l]}
    assert len(up.expert_deltas) > 0 and any(d["gate_up"].abs().max() > 0 for d in up.expert_deltas.values())
    # the global experts are untouched by the participant
    for (gu0, dn0), (gu1, dn1) in zip(before, global_experts(work.handle)):
        assert torch.equal(gu0, gu1) and torch.equal(dn0, dn1)
    # after aggregating this update, dropped experts keep their exact weights, kept ones move
    from flux.federation.aggregate import aggregate, apply_expert_deltas

    expert_mean, _ = aggregate([up])
    apply_expert_deltas(work.handle, expert_mean)
    after = global_experts(work.handle)
    for l in range(LAYERS):
        for e in range(EXPERTS):
            same = torch.equal(before[l][0][e], after[l][0][e]) and torch.equal(before[l][1][e], after[l][1][e])
            assert same == ((l, e) not in up.expert_deltas)
