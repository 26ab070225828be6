"""FLUX's measured budget policy: each participant splits its memory between tuning experts and
merged groups by the merge error it measures on its own data (``flux.budget_policy = "measured"``).

A participant's memory buys tuning experts (weights, gradients, optimizer state: what it
contributes) or merged groups (frozen int-N copies: how close the model it trains in is to the
global one).  ``flux.min_group_share`` fixes that split with one constant for every device and
model.  The measured policy instead tries, before round 1, the split of every share in
:data:`CANDIDATE_SHARES` (:func:`flux.moe.budgets_from_memory`), and keeps the one with the most
tuning experts whose merged view stays within ``flux.view_error_tolerance`` of the unmerged one:

* the **view**: the candidate's ``B_tune`` most-activated experts (a quantized profile of the
  sample) at full precision, every other expert merged from its int-``download_bits`` copy into
  the candidate's merged-group budget (:func:`flux.methods.flux.install_participant_view`, the
  same call a round makes);
* the **reference**: the same tuning experts, every other expert its own group (no merging);
* the **error**: relative L2 distance of the backbone's last hidden states, view vs reference,
  over the non-padding tokens of ``flux.budget_probe_samples`` local samples.  Hidden states,
  not the loss, because a new classification head is random before round 1: only the backbone's
  output says how far the merged experts moved the model.

If no candidate is within tolerance, the one with the smallest error wins.  Forward passes only,
like profiling; the measurement's wall time is charged to the participant's first round as
method overhead (it runs on the participant before it can take part).
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flux.methods.api import RunContext
    from flux.moe.memory_budget import MemoryBudget

# The group shares a participant tries (0 = tuning first, 1 = a group per non-tuning expert).
CANDIDATE_SHARES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class BudgetTrial:
    """One candidate split as a participant measured it."""

    share: float  # the min_group_share that gave it
    tune: int  # B_tune
    merged: int  # B_non (merged groups over all layers)
    error: float  # relative hidden-state error of its view (0 = the unmerged model's)


def last_hidden_states(model: torch.nn.Module, batches: Sequence[dict]) -> Tensor:
    """float32 [tokens, hidden]: the backbone's last hidden states of every non-padding token.

    Args:
        model: a workload model (``model.backbone(input_ids=, attention_mask=)``).
        batches: dicts with ``input_ids`` int64 [B, S] and ``attention_mask`` int64 [B, S].
    """
    out = []
    with torch.no_grad():
        for b in batches:
            h = model.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               use_cache=False).last_hidden_state
            out.append(h[b["attention_mask"].bool()].float())
    return torch.cat(out)


def relative_error(view: Tensor, reference: Tensor) -> float:
    """||view - reference|| / ||reference|| (Frobenius; 0 when both are zero)."""
    denom = float(reference.norm())
    return float((view - reference).norm()) / denom if denom > 0 else float(view.norm() > 0)


def choose(trials: Sequence[BudgetTrial], tolerance: float) -> int:
    """Index of the trial with the most tuning experts (then the most groups) whose error is
    at most ``tolerance``; else of the smallest error."""
    if not trials:
        raise ValueError("no budget trials to choose from")
    order = sorted(range(len(trials)), key=lambda i: (-trials[i].tune, -trials[i].merged))
    within = [i for i in order if trials[i].error <= tolerance]
    return within[0] if within else min(order, key=lambda i: trials[i].error)


def measure_trials(ctx: "RunContext", pid: int, candidates: Sequence["MemoryBudget"],
                   shares: Sequence[float]) -> list[BudgetTrial]:
    """Participant ``pid``'s error for each distinct candidate split (``candidates[i]`` came from
    ``shares[i]``; a split two shares give is measured once, under the smaller share)."""
    from flux.federation.rng import Stream, participant_generator
    from flux.federation.runner import profile_batches, profile_sample
    from flux.merging.install import uninstall
    from flux.methods.flux import install_participant_view, merged_group_total, most_activated
    from flux.profiling import profile_model

    cfg, work = ctx.cfg, ctx.work
    handle, data = work.handle, work.train[pid]
    num_experts = [layer.num_experts for layer in handle.moe_layers]
    picked = profile_sample(len(data), cfg.flux.budget_probe_samples,
                            participant_generator(cfg.seed, 0, pid, Stream.BUDGET_PROBE))
    batches = list(profile_batches(data, picked))
    profile = profile_model(work.model.backbone, batches, bits=cfg.flux.profile_bits, num_samples=len(data))

    def hidden_of_view(tuning: list[list[int]], total: int) -> Tensor:
        install_participant_view(handle, cfg, tuning, profile, total)
        try:
            return last_hidden_states(work.model, batches)
        finally:  # the originals stay under the view: removing it restores them
            uninstall(handle, write_back=False)

    trials: list[BudgetTrial] = []
    references: dict[int, tuple[list[list[int]], Tensor]] = {}
    for budget, share in zip(candidates, shares):
        if any(t.tune == budget.tune and t.merged == budget.merged for t in trials):
            continue
        if budget.tune not in references:
            tuning = most_activated(profile, budget.tune)
            unmerged = sum(e - len(t) for e, t in zip(num_experts, tuning))
            references[budget.tune] = (tuning, hidden_of_view(tuning, unmerged))
        tuning, reference = references[budget.tune]
        view = hidden_of_view(tuning, merged_group_total(budget.merged, tuning, num_experts))
        trials.append(BudgetTrial(share=float(share), tune=budget.tune, merged=budget.merged,
                                  error=relative_error(view, reference)))
    return trials


def measured_budgets(ctx: "RunContext", build: Callable[[int, float], "MemoryBudget"]) -> dict[str, Any]:
    """Every participant's measured split.

    Args:
        ctx: the run (its model is the pretrained one: setup runs before round 1).
        build: ``build(memory_bytes, min_group_share)`` -> that split's :class:`MemoryBudget`.

    Returns:
        ``{"budgets": {pid: MemoryBudget}, "trials": {pid: [BudgetTrial, ...]}, "chosen": {pid:
        index into trials}, "seconds": {pid: wall seconds of its measurement}, "candidates": {pid:
        the MemoryBudget of every share in CANDIDATE_SHARES}}``.  Each rank measures its share of
        the participants and they exchange their choices, so every rank holds the same budgets.
    """
    from flux.federation import distributed as fd
    from flux.federation.runner import my_share
    from flux.methods.api import per_device_memory

    candidates = per_device_memory(ctx, lambda memory: [build(memory, s) for s in CANDIDATE_SHARES])
    mine = {}
    for pid in my_share(list(range(len(ctx.devices))), ctx.rank, ctx.world):
        start = time.perf_counter()
        trials = measure_trials(ctx, pid, candidates[pid], CANDIDATE_SHARES)
        mine[pid] = {"trials": [dataclasses.asdict(t) for t in trials],
                     "chosen": choose(trials, ctx.cfg.flux.view_error_tolerance),
                     "seconds": time.perf_counter() - start}
    decisions = fd.all_gather_dict(mine)  # each rank measured its share; all now hold every choice
    out: dict[str, Any] = {"budgets": {}, "trials": {}, "chosen": {}, "seconds": {}, "candidates": {}}
    for pid in range(len(ctx.devices)):
        found = decisions[pid]
        trials = [BudgetTrial(**t) for t in found["trials"]]
        pick = trials[int(found["chosen"])]
        out["budgets"][pid] = candidates[pid][CANDIDATE_SHARES.index(pick.share)]
        out["trials"][pid], out["chosen"][pid] = trials, int(found["chosen"])
        out["seconds"][pid] = float(found["seconds"])
        out["candidates"][pid] = candidates[pid]
    return out
