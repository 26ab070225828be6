"""Budgets from memory (flux.moe.memory_budget): hand-computed bytes, the fit/overflow boundary, caps,
monotonicity, errors, and the real tensors of the chosen layout after an optimizer step."""
from __future__ import annotations

import math

import pytest
import torch

import flux
from flux.moe import LayerLayout, estimate_memory, measure_memory
from flux.moe.memory_budget import budgets_from_memory, fit_check, full_training_bytes, weights_bytes
from tests.moe.helpers import input_ids, step, tiny_mixtral

E, L, H, I = 8, 2, 32, 16
EXPERT = (2 * I * H + H * I) * 4  # fp32 bytes of one expert's weights: 6144
TUNING = 4 * EXPERT + 2 * 4       # weights + grad + AdamW exp_avg/exp_avg_sq + two fp32 step scalars
COUNTS, INDEX = L * E * 8, L * E * 4  # FLUX's int64 counts and int32 group index per layer


@pytest.fixture
def handle():
    return flux.patch(tiny_mixtral(num_local_experts=E))


def _non_expert_bytes(handle) -> int:
    experts = {id(p) for layer in handle for p in layer.source.expert_parameters()}
    counts = {id(layer.counts) for layer in handle}
    tensors = [*handle.model.parameters(), *handle.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if id(t) not in experts | counts)


def _min_layout(budget, extra_tuned_layer=None, extra_group_layer=None, floor=1):
    out = []
    for l, lay in enumerate(budget.layouts):
        tuned = lay.num_tuned + (l == extra_tuned_layer)
        groups = (floor if extra_group_layer is None else lay.merged_groups) + (l == extra_group_layer)
        out.append(LayerLayout(tuned=tuned, merged_groups=groups, quantize_bits=lay.quantize_bits,
                               quantize_group_size=lay.quantize_group_size, keep_originals=lay.keep_originals))
    return out


def test_hand_computed_budgets(handle):
    fixed = _non_expert_bytes(handle) + COUNTS + INDEX
    memory = fixed + 2 * TUNING + L * EXPERT + 3 * EXPERT + 100
    b = budgets_from_memory(handle, memory, max_tune_fraction=0.5)
    assert (b.fixed_bytes, b.per_tuning_expert_bytes, b.per_merged_group_bytes) == (fixed, TUNING, EXPERT)
    # t = 3 would need another 4 * EXPERT (the third expert shares a layer: no new step scalars)
    # but only 3 * EXPERT + 100 are left after the floor groups
    assert (b.tune, b.merged) == (2, L + 3)
    assert b.used_bytes == memory - 100 == b.report.total
    assert [(lay.num_tuned, lay.merged_groups) for lay in b.layouts] == [(1, 3), (1, 2)]
    # int4 groups of 16 columns: qdata 32*32/2 + 32*16/2, fp32 scales 32*2 + 32*1 per group
    q = budgets_from_memory(handle, memory, max_tune_fraction=0.5, frozen_bits=4, quantize_group_size=16)
    assert q.per_merged_group_bytes == 512 + 256 + (64 + 32) * 4
    assert weights_bytes(handle) == _non_expert_bytes(handle) + L * E * EXPERT + COUNTS
    assert full_training_bytes(handle) == weights_bytes(handle) + 3 * L * E * EXPERT + L * 2 * 4


@pytest.mark.parametrize("frozen_bits", [None, 4])
def test_chosen_layout_fits_and_one_more_unit_does_not(handle, frozen_bits):
    low = budgets_from_memory(handle, 10**9, max_tune_fraction=0.5).fixed_bytes
    for memory in range(low + TUNING + L * EXPERT, full_training_bytes(handle) + 1, 3001):
        b = budgets_from_memory(handle, memory, frozen_bits=frozen_bits, max_tune_fraction=0.5)
        total = estimate_memory(handle, b.layouts).total
        assert total == b.used_bytes <= memory
        assert fit_check(handle, memory, b.layouts) and not fit_check(handle, total - 1, b.layouts)
        assert sum(lay.num_tuned for lay in b.layouts) == b.tune
        assert sum(lay.merged_groups for lay in b.layouts) == b.merged
        assert all(1 <= lay.merged_groups and lay.num_tuned + lay.merged_groups <= E for lay in b.layouts)
        if b.tune < 8:  # the cap is 0.5 * 16; else one more tuning expert with the floor groups overflows
            cheapest = next((l for l, lay in enumerate(b.layouts) if 0 < lay.num_tuned < E - 1), None)
            assert cheapest is not None
            assert estimate_memory(handle, _min_layout(b, extra_tuned_layer=cheapest)).total > memory
        if b.merged < 2 * E - b.tune:  # else capped: one group per non-tuning expert
            room = next(l for l, lay in enumerate(b.layouts) if lay.num_tuned + lay.merged_groups < E)
            assert estimate_memory(handle, _min_layout(b, extra_group_layer=room)).total > memory


def test_budgets_are_monotone_in_memory(handle):
    previous = None
    start = budgets_from_memory(handle, 10**9).fixed_bytes + TUNING + L * EXPERT
    for memory in range(start, full_training_bytes(handle), 1500):
        b = budgets_from_memory(handle, memory)
        if previous is not None:
            assert b.tune >= previous.tune
            if b.tune == previous.tune:
                assert b.merged >= previous.merged
            assert b.used_bytes >= previous.used_bytes or b.tune > previous.tune
        previous = b
    assert (previous.tune, previous.merged) == (4, 12)  # both capped: 0.25 * 16 and 16 - 4


def test_caps(handle):
    huge = 10**9
    assert (lambda b: (b.tune, b.merged))(budgets_from_memory(handle, huge)) == (4, 12)
    # every expert may tune except the floor group of each layer
    b = budgets_from_memory(handle, huge, max_tune_fraction=1.0)
    assert (b.tune, b.merged) == (2 * E - L, L)
    b = budgets_from_memory(handle, huge, max_tune_fraction=1.0, min_merged_per_layer=3)
    assert (b.tune, b.merged) == (2 * E - 3 * L, 3 * L)
    # a tiny fraction still leaves one tuning expert
    assert budgets_from_memory(handle, huge, max_tune_fraction=0.01).tune == 1


def test_too_little_memory_raises_with_the_needed_bytes(handle):
    needed = _non_expert_bytes(handle) + COUNTS + INDEX + TUNING + L * EXPERT
    assert budgets_from_memory(handle, needed).tune == 1
    with pytest.raises(ValueError, match=f"at least {needed} bytes"):
        budgets_from_memory(handle, needed - 1)
    with pytest.raises(ValueError, match=f"at least {needed + 1000} bytes"):
        budgets_from_memory(handle, needed, activation_bytes=1000)
    with pytest.raises(ValueError, match="memory_bytes must be >= 0"):
        budgets_from_memory(handle, -1)
    with pytest.raises(ValueError, match="max_tune_fraction"):
        budgets_from_memory(handle, needed, max_tune_fraction=0)
    with pytest.raises(ValueError, match="frozen_bits"):
        budgets_from_memory(handle, needed, frozen_bits=3)
    with pytest.raises(ValueError, match="no room for a tuning expert"):
        budgets_from_memory(handle, needed, min_merged_per_layer=E)


def test_a_group_share_gives_up_tuning_experts_for_merged_groups(handle):
    fixed = _non_expert_bytes(handle) + COUNTS + INDEX
    memory = fixed + 2 * TUNING + L * EXPERT + 3 * EXPERT + 100
    assert (lambda b: (b.tune, b.merged))(budgets_from_memory(handle, memory, max_tune_fraction=0.5,
                                                              min_group_share=0.0)) == (2, L + 3)
    # t = 2 would need groups for ceil(0.5 * 14) = 7 experts: 2 * TUNING + 7 * EXPERT > what is left;
    # t = 1 needs 8 and leaves room for 9 (13 * EXPERT + 116 - TUNING)
    b = budgets_from_memory(handle, memory, max_tune_fraction=0.5, min_group_share=0.5)
    assert (b.tune, b.merged) == (1, 9) and b.used_bytes <= memory
    low = budgets_from_memory(handle, 10**9).fixed_bytes + TUNING + L * EXPERT
    for share in (0.25, 0.5, 1.0):
        for memory in range(low, full_training_bytes(handle) + 1, 2999):
            first = budgets_from_memory(handle, memory, max_tune_fraction=1.0)
            b = budgets_from_memory(handle, memory, max_tune_fraction=1.0, min_group_share=share)
            assert estimate_memory(handle, b.layouts).total == b.used_bytes <= memory
            assert b.tune <= first.tune
            if b.tune > 1:  # one tuning expert is the floor even where its share does not fit
                assert b.merged >= math.ceil(share * (2 * E - b.tune) - 1e-9)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="min_group_share"):
            budgets_from_memory(handle, memory, min_group_share=bad)


def test_int4_frozen_groups_buy_more_merged_groups(handle):
    # the tuning cap (2 of 16) holds B_tune equal: cheaper floor groups would otherwise buy a
    # third tuning expert first
    memory = budgets_from_memory(handle, 10**9).fixed_bytes + 2 * TUNING + 6 * EXPERT
    dense = budgets_from_memory(handle, memory, max_tune_fraction=0.125)
    int4 = budgets_from_memory(handle, memory, max_tune_fraction=0.125, frozen_bits=4)
    assert int4.tune == dense.tune == 2
    assert int4.merged > dense.merged
    assert int4.per_merged_group_bytes < dense.per_merged_group_bytes


def test_training_non_expert_parameters_raises_the_fixed_bytes(handle):
    frozen = budgets_from_memory(handle, 10**9)
    trained = budgets_from_memory(handle, 10**9, trainable="all")
    params = [p for p in handle.model.parameters()
              if id(p) not in {id(q) for layer in handle for q in layer.source.expert_parameters()}]
    state = sum(3 * p.numel() * 4 + 4 for p in params)  # grad + exp_avg + exp_avg_sq + step
    assert trained.fixed_bytes - frozen.fixed_bytes == state


def test_the_chosen_layout_holds_exactly_its_bytes_after_a_step(handle):
    model = handle.model
    b = budgets_from_memory(handle, budgets_from_memory(handle, 10**9).fixed_bytes + 3 * TUNING + 7 * EXPERT,
                            frozen_bits=8, quantize_group_size=16)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, lay in zip(handle, b.layouts):
        t, g = lay.num_tuned, lay.merged_groups
        rest = list(range(t, E))
        layer.install_merged_view(tuning=list(range(t)), clusters=[rest[c::g] for c in range(g)],
                                  quantize_bits=8, quantize_group_size=16, keep_originals=False)
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
    step(model, input_ids())
    opt.step()
    assert measure_memory(model, opt).total == b.used_bytes
