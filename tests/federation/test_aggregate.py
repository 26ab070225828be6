"""flux.federation.aggregate: per-expert token-weighted averages, validation, determinism,
gathering over a real 2-process gloo group, applying deltas through the flux.patch handle."""
from __future__ import annotations

import random

import pytest
import torch

from flux.federation.aggregate import (Update, aggregate, apply_expert_deltas, broadcast_object, gather_updates,
                                       validate_update)

H, I = 4, 3
EXPERT_SHAPES = {"gate_up": torch.Size([2 * I, H]), "down": torch.Size([H, I])}
DENSE_SHAPES = {"head.weight": torch.Size([2, H]), "head.bias": torch.Size([2])}


def delta(value: float) -> dict[str, torch.Tensor]:
    return {"gate_up": torch.full((2 * I, H), value), "down": torch.full((H, I), value)}


def random_update(pid: int, gen: torch.Generator) -> Update:
    keys = [(l, e) for l in range(2) for e in range(4) if torch.rand(1, generator=gen) < 0.6]
    return Update(
        participant=pid,
        expert_deltas={k: {"gate_up": torch.randn(2 * I, H, generator=gen), "down": torch.randn(H, I, generator=gen)}
                       for k in keys},
        expert_tokens={k: int(torch.randint(0, 50, (1,), generator=gen)) for k in keys},
        dense_deltas={"head.weight": torch.randn(2, H, generator=gen), "head.bias": torch.randn(2, generator=gen)},
        num_samples=int(torch.randint(1, 40, (1,), generator=gen)),
        utilities={k: float(torch.rand(1, generator=gen)) for k in keys},
    )


def test_expert_weights_are_the_routed_tokens():
    a = Update(0, {(0, 1): delta(1.0)}, {(0, 1): 1}, num_samples=1)
    b = Update(1, {(0, 1): delta(5.0), (1, 2): delta(2.0)}, {(0, 1): 3, (1, 2): 7}, num_samples=1)
    experts, dense = aggregate([a, b])
    assert set(experts) == {(0, 1), (1, 2)}  # experts nobody tuned are absent (left unchanged)
    assert torch.equal(experts[(0, 1)]["gate_up"], torch.full((2 * I, H), 0.25 * 1.0 + 0.75 * 5.0))
    assert torch.equal(experts[(0, 1)]["down"], torch.full((H, I), 4.0))
    assert torch.equal(experts[(1, 2)]["down"], torch.full((H, I), 2.0))  # one participant: its own delta
    assert dense == {}


def test_zero_token_experts_get_a_plain_mean_and_missing_tokens_count_as_zero():
    a = Update(0, {(0, 0): delta(1.0), (0, 1): delta(1.0)}, {(0, 0): 0}, num_samples=1)
    b = Update(1, {(0, 0): delta(2.0), (0, 1): delta(3.0)}, {(0, 0): 0, (0, 1): 4}, num_samples=1)
    experts, _ = aggregate([a, b])
    assert torch.equal(experts[(0, 0)]["gate_up"], torch.full((2 * I, H), 1.5))  # all weights 0: mean
    assert torch.equal(experts[(0, 1)]["gate_up"], torch.full((2 * I, H), 3.0))  # a has weight 0


def test_dense_deltas_are_weighted_by_samples_over_the_updates_that_carry_them():
    a = Update(0, dense_deltas={"head.bias": torch.tensor([1.0, 0.0]), "head.weight": torch.ones(2, H)},
               num_samples=10)
    b = Update(1, dense_deltas={"head.bias": torch.tensor([4.0, 8.0])}, num_samples=30)
    _, dense = aggregate([a, b])
    assert torch.allclose(dense["head.bias"], torch.tensor([3.25, 6.0]))
    assert torch.equal(dense["head.weight"], torch.ones(2, H))


def test_order_does_not_matter_bitwise_and_dtype_is_kept():
    gen = torch.Generator().manual_seed(0)
    updates = [random_update(p, gen) for p in range(6)]
    updates[2].expert_deltas = {k: {n: t.to(torch.bfloat16) for n, t in d.items()}
                                for k, d in updates[2].expert_deltas.items()}
    ref_e, ref_d = aggregate(updates)
    for seed in range(3):
        shuffled = list(updates)
        random.Random(seed).shuffle(shuffled)
        e, d = aggregate(shuffled)
        assert list(e) == list(ref_e)
        for k in e:
            for n in e[k]:
                assert torch.equal(e[k][n], ref_e[k][n])
        assert all(torch.equal(d[n], ref_d[n]) for n in d)
    # split across "ranks" and gathered: the same set gives the same bits
    merged = gather_updates(updates[3:]) + gather_updates(updates[:3])
    assert all(torch.equal(aggregate(merged)[0][k]["down"], ref_e[k]["down"]) for k in ref_e)
    assert all(d["gate_up"].dtype == torch.float32 for d in ref_e.values())  # bf16 + fp32 -> fp32


def test_result_dtype_is_the_promoted_dtype_of_the_deltas():
    bf = {n: t.to(torch.bfloat16) for n, t in delta(1.0).items()}
    a = Update(0, {(0, 0): bf, (0, 1): bf}, {(0, 0): 1, (0, 1): 1})
    b = Update(1, {(0, 1): delta(3.0)}, {(0, 1): 1})
    experts, _ = aggregate([a, b])
    assert experts[(0, 0)]["down"].dtype == torch.bfloat16
    assert experts[(0, 1)]["down"].dtype == torch.float32 and float(experts[(0, 1)]["down"][0, 0]) == 2.0


def test_duplicate_participants_are_refused():
    with pytest.raises(ValueError, match="participant 3"):
        aggregate([Update(3), Update(3)])


@pytest.mark.parametrize("mutate, words", [
    (lambda u: u.expert_deltas[(0, 1)]["down"].__setitem__((0, 0), float("nan")), "non-finite"),
    (lambda u: u.expert_deltas[(0, 1)]["gate_up"].__setitem__((1, 1), float("inf")), "non-finite"),
    (lambda u: u.expert_deltas[(0, 1)].__setitem__("down", torch.zeros(I, H)), "shape (3, 4), expected (4, 3)"),
    (lambda u: u.expert_deltas[(0, 1)].__setitem__("down", torch.zeros(H, I, dtype=torch.int64)), "dtype"),
    (lambda u: u.expert_deltas[(0, 1)].__setitem__("up", torch.zeros(H, I)), "unknown parameter 'up'"),
    (lambda u: u.expert_deltas[(0, 1)].pop("down"), "missing parameter 'down'"),
    (lambda u: u.expert_deltas.__setitem__((0, -1), delta(0.0)), "(layer, expert)"),
    (lambda u: u.dense_deltas.__setitem__("lm_head.weight", torch.zeros(2)), "unknown dense parameter"),
    (lambda u: u.dense_deltas.__setitem__("head.bias", torch.tensor([float("nan"), 0.0])), "non-finite"),
    (lambda u: u.dense_deltas.__setitem__("head.bias", torch.zeros(3)), "shape"),
    (lambda u: u.expert_tokens.__setitem__((0, 1), -2), "expert_tokens"),
    (lambda u: setattr(u, "num_samples", 2.5), "num_samples"),
    (lambda u: u.utilities.__setitem__((0, 1), float("nan")), "utility"),
])
def test_validate_rejects_with_a_reason(mutate, words):
    u = Update(4, {(0, 1): delta(0.5)}, {(0, 1): 3}, {"head.bias": torch.zeros(2)}, num_samples=8,
               utilities={(0, 1): 1.0})
    assert validate_update(u, EXPERT_SHAPES, DENSE_SHAPES) is None
    mutate(u)
    reason = validate_update(u, EXPERT_SHAPES, DENSE_SHAPES)
    assert reason is not None and words in reason, reason


def test_validate_checks_expert_ranges_when_given():
    u = Update(0, {(1, 5): delta(0.0)}, {(1, 5): 1})
    assert validate_update(u, EXPERT_SHAPES, {}, num_experts=[8, 8]) is None
    assert "does not exist" in validate_update(u, EXPERT_SHAPES, {}, num_experts=[8, 4])
    assert "does not exist" in validate_update(u, EXPERT_SHAPES, {}, num_experts=[8])


def test_without_a_process_group_gather_sorts_and_broadcast_is_identity():
    out = gather_updates([Update(5), Update(1), Update(3)])
    assert [u.participant for u in out] == [1, 3, 5]
    obj = {"x": 1}
    assert broadcast_object(obj) is obj


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)
        updates = [random_update(p, gen) for p in range(5)]
        mine = [u for i, u in enumerate(updates) if i % world == rank]  # rank 0: 0, 2, 4; rank 1: 1, 3
        gathered = gather_updates(list(reversed(mine)))
        experts, dense = aggregate(gathered)
        plan = broadcast_object({"round": 7, "from": rank})
        torch.save({"pids": [u.participant for u in gathered], "experts": experts, "dense": dense, "plan": plan},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_under_a_real_two_process_gloo_group(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["pids"] == r1["pids"] == [0, 1, 2, 3, 4]
    assert r0["plan"] == r1["plan"] == {"round": 7, "from": 0}
    gen = torch.Generator().manual_seed(0)
    ref_e, ref_d = aggregate([random_update(p, gen) for p in range(5)])  # one process, all updates
    for res in (r0, r1):
        assert list(res["experts"]) == list(ref_e)
        for k in ref_e:
            assert all(torch.equal(res["experts"][k][n], ref_e[k][n]) for n in ref_e[k])
        assert all(torch.equal(res["dense"][n], ref_d[n]) for n in ref_d)


def test_apply_expert_deltas_through_the_patch_handle():
    import flux
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    cfg._attn_implementation = "eager"
    handle = flux.patch(MixtralForCausalLM(cfg))
    before = {(l, e): handle.moe_layers[l].expert_weights(e) for l in range(2) for e in range(4)}
    before = {k: (w.gate_up.clone(), w.down.clone()) for k, w in before.items()}
    d = {"gate_up": torch.full((16, 16), 0.5), "down": torch.full((16, 8), -0.25)}
    assert apply_expert_deltas(handle, {(1, 2): d}) == 1
    for (l, e), (gu, dn) in before.items():
        now = handle.moe_layers[l].expert_weights(e)
        if (l, e) == (1, 2):
            assert torch.equal(now.gate_up, gu + 0.5) and torch.equal(now.down, dn - 0.25)
        else:
            assert torch.equal(now.gate_up, gu) and torch.equal(now.down, dn)
