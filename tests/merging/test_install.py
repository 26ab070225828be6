"""Merge plans installed on a patched model (flux.merging.install): outputs against a hand-built
per-expert reference, gradients, FMES dropping, write-back, int4 frozen groups, Eq. 1 budgets."""
from __future__ import annotations

import copy

import pytest
import torch

import flux
from flux.merging import layer_budgets
from flux.merging.install import (
    collect_tuned,
    drop_model,
    install_merge,
    layer_weight_stacks,
    merge_model,
    single_budgets,
    uniform_budgets,
    uninstall,
)
from flux.moe import estimate_memory, LayerLayout, measure_memory
from tests.moe.helpers import assert_close, input_ids, rel_err, tiny_mixtral

E = 8  # experts per layer; 2 MoE layers, H=32, I=16


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _setup(seed: int = 0):
    """(patched model, unpatched eager copy, handle, ids, tuning, freqs, attn) with a profile of
    the patched model: tuning = the two most activated experts of each layer."""
    model = tiny_mixtral(seed, num_local_experts=E)
    ref = copy.deepcopy(model)
    ref.set_experts_implementation("eager")  # transformers' per-expert loop: the reference
    handle = flux.patch(model)
    ids = input_ids(seed, batch=2, seq=12)
    with torch.no_grad():
        model(ids)
    counts = [layer.counts.clone() for layer in handle]
    freqs = [(c.double() + 1) / (c.sum() + E) for c in counts]  # +1: every alpha > 0
    gen = torch.Generator().manual_seed(seed + 1)
    attn = [torch.rand(E, generator=gen, dtype=torch.float64) + 0.1 for _ in handle]
    tuning = [c.topk(2).indices.sort().values.tolist() for c in counts]
    return model, ref, handle, ids, tuning, freqs, attn


def _ref_experts(ref, l: int):
    return ref.model.layers[l].mlp.experts


def _load_effective_weights(ref, plans, freqs, attn) -> None:
    """Give every expert of ``ref`` the weights of the group serving it, computed by hand from
    the plan's clusters with Eq. 2 (alpha = f * attn, normalised in the cluster); dropped
    experts get zero weights (their output is exactly 0)."""
    with torch.no_grad():
        for l, plan in enumerate(plans):
            ex = _ref_experts(ref, l)
            gu0, dn0 = ex.gate_up_proj.clone(), ex.down_proj.clone()
            e2g = plan.expert_to_group.tolist()
            for e, g in enumerate(e2g):
                if g < 0:
                    ex.gate_up_proj[e].zero_()
                    ex.down_proj[e].zero_()
                elif g < plan.num_tuning:
                    continue  # a tuning expert is served by its own original weights
                else:
                    members = [j for j, h in enumerate(e2g) if h == g]
                    alpha = torch.tensor([float(freqs[l][j] * attn[l][j]) for j in members], dtype=torch.float64)
                    alpha = alpha / alpha.sum()
                    ex.gate_up_proj[e] = sum(a * gu0[j].double() for a, j in zip(alpha, members)).float()
                    ex.down_proj[e] = sum(a * dn0[j].double() for a, j in zip(alpha, members)).float()


def _loss_and_logits(model, ids):
    out = model(ids, labels=ids, use_cache=False)
    return out.loss, out.logits


# ------------------------------------------------------------------------------------ stacks
def test_layer_weight_stacks_are_the_originals_without_copy():
    model, _, handle, *_ = _setup()
    stacks = layer_weight_stacks(handle)
    assert len(stacks) == 2
    for layer, s in zip(handle, stacks):
        ex = layer.source.module
        assert set(s) == {"gate_up", "down"}
        assert s["gate_up"].shape == (E, 32, 32) and s["down"].shape == (E, 32, 16)
        assert s["gate_up"].data_ptr() == ex.gate_up_proj.data_ptr()  # zero-copy for fused experts
        assert not s["gate_up"].requires_grad
        for e in (0, 5):
            assert torch.equal(s["down"][e], layer.expert_weights(e).down)


# ------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("clustering", ["kmeans", "weighted"])
def test_merged_model_matches_hand_built_reference(clustering):
    model, ref, handle, ids, tuning, freqs, attn = _setup()
    before = _loss_and_logits(model, ids)[1].detach()
    plans = merge_model(handle, tuning, freqs, attn, total_budget=5, clustering=clustering)
    budgets = layer_budgets(freqs, [6, 6], 5)
    if clustering == "kmeans":
        assert [p.num_groups for p in plans] == [2 + b for b in budgets]
    else:  # a group whose members all went to the drop option disappears
        assert all(1 <= p.num_groups - 2 <= b for p, b in zip(plans, budgets))
    _load_effective_weights(ref, plans, freqs, attn)
    loss, logits = _loss_and_logits(model, ids)
    ref_loss, ref_logits = _loss_and_logits(ref, ids)
    assert_close(ref_logits, logits, "merged logits")
    assert_close(ref_loss, loss, "merged loss")
    assert rel_err(before, logits) > 1e-3, "merging changed nothing: the comparison would be vacuous"


def test_tuning_experts_get_gradients_and_merged_groups_do_not():
    model, ref, handle, ids, tuning, freqs, attn = _setup()
    plans = merge_model(handle, tuning, freqs, attn, total_budget=4)
    _load_effective_weights(ref, plans, freqs, attn)
    originals = [p for layer in handle for p in layer.source.expert_parameters()]
    _loss_and_logits(model, ids)[0].backward()
    _loss_and_logits(ref, ids)[0].backward()
    assert all(p.grad is None for p in originals), "the original experts must not be trained under a view"
    trainable = {id(p) for p in handle.trainable_parameters()}
    for l, (layer, plan) in enumerate(zip(handle, plans)):
        view = layer.view
        assert view.num_tuned == 2 and view.tuned_experts == tuning[l]
        for name, buf in view.named_buffers():
            assert not buf.requires_grad and id(buf) not in trainable, name
        ex = _ref_experts(ref, l)
        for g, e in enumerate(plan.tuning_experts.tolist()):
            assert view.tuned_gate_up.grad[g].abs().sum() > 0, f"tuning expert {e} of layer {l} got no gradient"
            assert_close(ex.gate_up_proj.grad[e], view.tuned_gate_up.grad[g], f"grad gate_up layer {l} expert {e}")
            assert_close(ex.down_proj.grad[e], view.tuned_down.grad[g], f"grad down layer {l} expert {e}")
    assert len(trainable) == 4  # gate_up + down stack per layer, nothing else


def test_eq1_budget_plan_installs_with_the_right_group_counts():
    model, _, handle, ids, tuning, _, attn = _setup()
    # layer 0 flat, layer 1 peaked: Eq. 1 gives layer 0 (shallow and flat) most of the groups
    freqs = [torch.full((E,), 1.0 / E, dtype=torch.float64),
             torch.tensor([0.6, 0.2, 0.1, 0.04, 0.03, 0.01, 0.01, 0.01], dtype=torch.float64)]
    tuning = [[0, 7], [0, 1, 2]]
    expected = layer_budgets(freqs, [6, 5], 8)
    assert expected[0] > expected[1]
    plans = merge_model(handle, tuning, freqs, attn, total_budget=8)
    for layer, plan, t, b in zip(handle, plans, tuning, expected):
        assert layer.view.num_tuned == len(t) and layer.view.num_frozen == b
        assert plan.num_groups == len(t) + b
        assert sorted(set(plan.expert_to_group.tolist())) == list(range(len(t) + b))
    # explicit ablation budgets go through the same path
    uninstall(handle)
    plans = merge_model(handle, tuning, freqs, attn, budgets=uniform_budgets([6, 5], 8))
    assert [layer.view.num_frozen for layer in handle] == [4, 4]


def test_quantize_bits_4_stores_frozen_groups_quantized():
    model, ref, handle, ids, tuning, freqs, attn = _setup()
    plans = merge_model(handle, tuning, freqs, attn, total_budget=6, quantize_bits=4, keep_originals=False)
    for layer, plan in zip(handle, plans):
        view = layer.view
        frozen = plan.num_groups - plan.num_tuning
        buffers = dict(view.named_buffers())
        assert "frozen_gate_up" not in buffers and "frozen_down" not in buffers
        assert buffers["frozen_gate_up_qdata"].dtype == torch.uint8
        assert buffers["frozen_gate_up_qdata"].numel() == frozen * 32 * 32 // 2  # two int4 per byte
        assert buffers["frozen_down_qdata"].numel() == frozen * 32 * 16 // 2
        assert layer.source.released
    # reference: the dequantized groups, expert by expert
    with torch.no_grad():
        for l, (layer, plan) in enumerate(zip(handle, plans)):
            ex = _ref_experts(ref, l)
            for e, g in enumerate(plan.expert_to_group.tolist()):
                w = layer.view.group_weights(g)
                ex.gate_up_proj[e].copy_(w.gate_up)
                ex.down_proj[e].copy_(w.down)
        q_err = max(rel_err(plan.merged_weights["gate_up"], torch.stack(
            [layer.view.group_weights(g).gate_up for g in range(plan.num_tuning, plan.num_groups)]))
            for layer, plan in zip(handle, plans))
    assert q_err > 1e-4, "frozen groups were not quantized"
    assert_close(_loss_and_logits(ref, ids)[1], _loss_and_logits(model, ids)[1], "int4 merged logits")
    # the resident bytes are the memory accounting's
    for p in model.parameters():
        p.requires_grad_(False)
    layouts = [LayerLayout(tuned=p.num_tuning, merged_groups=p.num_groups - p.num_tuning, quantize_bits=4,
                           keep_originals=False) for p in plans]
    assert measure_memory(model).weights == estimate_memory(handle, layouts).weights


# ------------------------------------------------------------------------------------ drop
@pytest.mark.parametrize("trainable", [True, False])
def test_drop_model_drops_exactly_the_other_experts(trainable):
    model, ref, handle, ids, *_ = _setup()
    keep = [[0, 3], [5, 1, 2]]
    drop_model(handle, keep, trainable=trainable)
    with torch.no_grad():
        for l, kept in enumerate(keep):
            ex = _ref_experts(ref, l)
            for e in range(E):
                if e not in kept:
                    ex.gate_up_proj[e].zero_()
                    ex.down_proj[e].zero_()
    assert_close(_loss_and_logits(ref, ids)[1], _loss_and_logits(model, ids)[1], "FMES logits")
    for layer, kept in zip(handle, keep):
        view = layer.view
        assert view.dropped_experts == [e for e in range(E) if e not in kept]
        assert view.num_groups == len(kept)
        assert view.tuned_experts == (sorted(kept) if trainable else [])
    assert len(handle.trainable_parameters()) == (4 if trainable else 0)


def test_drop_model_rejects_an_empty_layer():
    _, _, handle, *_ = _setup()
    with pytest.raises(ValueError, match="keep_per_layer is empty"):
        drop_model(handle, [[0], []])
    assert all(layer.view is None for layer in handle)


# ------------------------------------------------------------------------------------ read back
@pytest.mark.parametrize("keep_originals", [True, False])
def test_uninstall_writes_tuned_back_and_restores_the_rest_bit_exactly(keep_originals):
    model, _, handle, ids, tuning, freqs, attn = _setup()
    before = [{k: v.clone() for k, v in s.items()} for s in layer_weight_stacks(handle)]
    merge_model(handle, tuning, freqs, attn, total_budget=5, keep_originals=keep_originals)
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=0.5)
    _loss_and_logits(model, ids)[0].backward()
    opt.step()
    tuned = collect_tuned(handle)
    assert sorted(tuned) == [(l, e) for l in range(2) for e in tuning[l]]
    assert all(not torch.equal(tuned[(l, e)].gate_up, before[l]["gate_up"][e]) for l, e in tuned), "no training"
    if keep_originals:
        uninstall(handle)
    else:
        with pytest.raises(ValueError, match="released"):
            uninstall(handle)
        uninstall(handle, full_weights=before)
    after = layer_weight_stacks(handle)
    for l, layer in enumerate(handle):
        assert layer.view is None
        for e in range(E):
            for key in ("gate_up", "down"):
                expected = getattr(tuned[(l, e)], key) if (l, e) in tuned else before[l][key][e]
                assert torch.equal(after[l][key][e], expected), (l, e, key)


def test_collect_tuned_copies_are_snapshots():
    _, _, handle, _, tuning, freqs, attn = _setup()
    merge_model(handle, tuning, freqs, attn, total_budget=4)
    snap, live = collect_tuned(handle), collect_tuned(handle, copy=False)
    with torch.no_grad():
        handle[0].view.tuned_down.add_(1.0)
    key = (0, tuning[0][0])
    assert torch.equal(live[key].down, handle[0].view.tuned_down[0])
    assert not torch.equal(snap[key].down, live[key].down)


# ------------------------------------------------------------------------------------ install
def test_install_is_all_or_nothing():
    _, _, handle, _, tuning, freqs, attn = _setup()
    from flux.merging import plan_model_merge

    plans = plan_model_merge(layer_weight_stacks(handle), tuning, freqs, attn, 4)
    plans[1].expert_to_group[0] = 99  # layer 1's view fails after layer 0's was installed
    with pytest.raises(IndexError, match="99"):
        install_merge(handle, plans, keep_originals=False)
    assert all(layer.view is None and not layer.source.released for layer in handle)
    with pytest.raises(ValueError, match="3 entries"):
        install_merge(handle, plans + plans[:1])
    plans[1].expert_to_group[0] = plans[0].expert_to_group[0]
    install_merge(handle, plan_model_merge(layer_weight_stacks(handle), tuning, freqs, attn, 4))
    with pytest.raises(RuntimeError, match="already installed"):
        install_merge(handle, plans)


# ------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize(
    "counts, total, expected",
    [
        ([6, 6, 6], 7, [3, 2, 2]),  # remainder to the shallowest layer
        ([6, 6, 6], 3, [1, 1, 1]),
        ([1, 6, 6], 9, [1, 4, 4]),  # a full layer's share goes to the others
        ([0, 4, 4], 5, [0, 3, 2]),  # layers without non-tuning experts get 0
        ([2, 3], 5, [2, 3]),
    ],
)
def test_uniform_budgets(counts, total, expected):
    assert uniform_budgets(counts, total) == expected


def test_uniform_and_single_budgets_errors():
    assert single_budgets([3, 0, 5]) == [1, 0, 1]
    with pytest.raises(ValueError, match="total=1"):
        uniform_budgets([3, 3], 1)
    with pytest.raises(ValueError, match="total=7"):
        uniform_budgets([3, 3], 7)
    with pytest.raises(ValueError, match="nontuning_per_layer"):
        single_budgets([3, -1])
