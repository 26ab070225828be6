"""The FLUX method on the engine: profile -> roles -> merge -> train tuning experts -> upload.

Per round and sampled participant:

1. the profile (quantized, forward-only; one round stale when ``flux.stale_profiling``) gives
   per-layer activation frequencies and attention scores on the participant's data;
2. the server (every rank, identically) scores experts and assigns roles under the participant's
   tuning budget (Eq. 3/4, epsilon schedule);
3. the participant merges its non-tuning experts into its merged-group budget (Eq. 1/2) and
   installs the merged view: tuning experts are the trainable groups;
4. local training; the uploaded update holds only the tuning experts' deltas (merged experts are
   lossy local copies and never leave the participant), weighted by the tokens routed to them.

Utility bookkeeping (decided here; PAPER.md leaves it open).  Eq. 3 needs per-sample gradient
norms of each tuning expert.  Each local mini-batch of B samples is split into ``m`` micro-batches
(``flux.utility_micro_batches``); the increment of a tuning group's gradient over micro-batch c,
times B, is the sum of that micro-batch's per-sample gradients, and sum_c ||B inc_c||^2 estimates
sum_k ||g_k||^2 (exact for m = B; unbiased when per-sample gradients are uncorrelated).  |D_e| is
the number of trained samples the profile routes to e (scaled up when only a sample of the data
was profiled: :func:`routed_sample_counts`).  Experts a participant did not tune
recently are scored by their current activation share times the participant's ratio kappa of
measured utility to activation share over the experts it did tune (round 1: kappa = 1, i.e. the
paper's normalised-frequency utility).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from flux.federation.local import round_lr
from flux.federation.rng import Stream, participant_generator
from flux.federation.update import Update
from flux.methods.api import Method, RunContext, per_device_memory

# Measured utilities older than this many rounds give way to the frequency-based prediction.
UTILITY_TTL_ROUNDS = 3


class Flux(Method):
    name = "flux"
    needs_profiles = True
    # the [flux] keys the engine reads for every profiling method (profile_bits, profile_samples,
    # stale_profiling, hide_idle_profiling) are not among them
    own_config_keys = tuple(f"flux.{k}" for k in (
        "merge_mode", "merge_clustering", "epsilon_start", "epsilon_end", "epsilon_rounds", "exploration",
        "exploration_draw", "zo_sigma", "zo_perturbations", "max_tune_fraction", "min_group_share",
        "utility_micro_batches", "utility_steps", "frozen_format", "optimizer", "budget_policy",
        "view_error_tolerance", "budget_probe_samples"))

    def __init__(self) -> None:
        self.budgets: dict[int, Any] = {}
        self.measured: dict[int, dict[tuple[int, int], tuple[int, float]]] = {}
        self.kappa: dict[int, float] = {}
        # budget_policy = "measured": each participant's trials, and the wall seconds of its
        # measurement not yet charged (to its first round)
        self.budget_trials: dict[int, list] = {}
        self.budget_candidates: dict[int, list] = {}
        self.uncharged_setup_s: dict[int, float] = {}
        self.charged_now: dict[int, float] = {}  # this round's share of it, per sampled participant
        self.measure_s: dict[str, float] = {}  # each participant's measurement, wall seconds

    # ------------------------------------------------------------------ server side
    def setup(self, ctx: RunContext) -> None:
        from flux.moe.memory_budget import budgets_from_memory
        from flux.moe.merged_view import FROZEN_FORMATS

        f = ctx.cfg.flux
        dense = list(self.dense_parameters(ctx).values())

        def build(memory: int, share: float):
            return budgets_from_memory(ctx.work.handle, memory, optimizer=f.optimizer, trainable=dense,
                                       frozen_bits=FROZEN_FORMATS[f.frozen_format],
                                       max_tune_fraction=f.max_tune_fraction, min_group_share=share)

        if f.budget_policy == "measured":
            from flux.methods.budget_policy import measured_budgets

            found = measured_budgets(ctx, build)
            self.budgets, self.budget_trials = found["budgets"], found["trials"]
            self.budget_candidates = found["candidates"]
            self.uncharged_setup_s = dict(found["seconds"])
            self.measure_s = {str(pid): round(v, 4) for pid, v in found["seconds"].items()}
        else:
            self.budgets = per_device_memory(ctx, lambda memory: build(memory, f.min_group_share))

    def setup_lines(self, ctx: RunContext) -> list[str]:
        """Each device class's budgets (and, when measured, each participant's split)."""
        if not self.budget_trials:
            seen: dict[str, Any] = {}
            for pid, dev in enumerate(ctx.devices):
                seen.setdefault(dev.name, self.budgets[pid])
            return [f"budgets ({ctx.cfg.flux.budget_policy}, min_group_share {ctx.cfg.flux.min_group_share}): "
                    + "; ".join(f"{name}: {b.tune} tuning experts + {b.merged} merged groups"
                                for name, b in seen.items())]
        lines = []
        for pid, dev in enumerate(ctx.devices):
            b = self.budgets[pid]
            tried = ", ".join(f"{t.tune}+{t.merged}: {t.error:.3f}" for t in self.budget_trials[pid])
            lines.append(f"budget of participant {pid} ({dev.name}, measured): {b.tune} tuning experts + "
                         f"{b.merged} merged groups; view error per split {tried} "
                         f"(tolerance {ctx.cfg.flux.view_error_tolerance})")
        return lines

    def report(self) -> dict:
        """``summary.json``'s ``method_report``: every participant's budgets (and trials)."""
        import dataclasses

        return {"budget_policy_s": self.measure_s,
                "budgets": {str(pid): {"tune": b.tune, "merged": b.merged,
                                       "trials": [dataclasses.asdict(t) for t in self.budget_trials.get(pid, [])]}
                            for pid, b in self.budgets.items()}}

    def schedule(self, ctx: RunContext):
        from flux.roles import EpsilonSchedule

        f = ctx.cfg.flux
        return EpsilonSchedule(start=f.epsilon_start, end=f.epsilon_end, rounds=f.epsilon_rounds)

    def utilities(self, round_idx: int, pid: int, profile) -> list[Tensor]:
        """Per layer float64 [E]: measured Eq. 3 utility where recent, else kappa * activation share."""
        from flux.roles import activation_utilities

        shares = activation_utilities(profile.frequencies())
        kappa = self.kappa.get(pid, 1.0)
        utils = [s * kappa for s in shares]
        for (l, e), (r, u) in self.measured.get(pid, {}).items():
            if round_idx - r <= UTILITY_TTL_ROUNDS:
                utils[l][e] = u
        return utils

    def plan(self, ctx: RunContext, round_idx: int, sampled: list[int], profiles: dict[int, Any]) -> dict[int, Any]:
        from flux.roles import assign_roles

        # every rank plans every sampled participant: the one place a first round is known everywhere
        self.charged_now = {pid: self.uncharged_setup_s.pop(pid) for pid in sampled if pid in self.uncharged_setup_s}
        utils = [self.utilities(round_idx, pid, profiles[pid]) for pid in sampled]
        budgets = [self.budgets[pid].tune for pid in sampled]
        gen = participant_generator(ctx.cfg.seed, round_idx, 0, Stream.ROLE_ASSIGNMENT)
        roles = assign_roles(utils, budgets, round_idx=round_idx, schedule=self.schedule(ctx), generator=gen,
                             draw=ctx.cfg.flux.exploration_draw)
        return dict(zip(sampled, roles))

    def trained_experts(self, ctx: RunContext, round_idx: int, pid: int, roles: Any, profile: Any) -> set:
        """The tuning experts (exploration ones included); the others are only merged."""
        return {(l, int(e)) for l, t in enumerate(roles.tuning) for e in t.tolist()}

    def observe(self, ctx: RunContext, round_idx: int, updates: list[Update]) -> None:
        for u in updates:
            if not u.utilities:
                continue
            mine = self.measured.setdefault(u.participant, {})
            for key, val in u.utilities.items():
                mine[key] = (round_idx, float(val))
            share = u.costs.extra.get("tuned_share", 0.0)
            if share > 0:
                self.kappa[u.participant] = float(sum(u.utilities.values())) / share

    def state_dict(self) -> dict:
        return {"measured": self.measured, "kappa": self.kappa, "uncharged_setup_s": self.uncharged_setup_s,
                "splits": {pid: [b.tune, b.merged] for pid, b in self.budgets.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.measured = {int(k): dict(v) for k, v in state["measured"].items()}
        self.kappa = {int(k): float(v) for k, v in state["kappa"].items()}
        # a resumed run measured its splits again in setup, on the same pretrained model; only the
        # participants not yet sampled before the checkpoint still owe the measurement's time
        self.uncharged_setup_s = {int(k): float(v) for k, v in state.get("uncharged_setup_s", {}).items()}
        # and keeps the splits it ran with, even where a re-measured error fell on the other side
        # of the tolerance (another thread count sums in another order)
        for pid, (tune, merged) in state.get("splits", {}).items():
            same = [b for b in self.budget_candidates.get(int(pid), []) if (b.tune, b.merged) == (tune, merged)]
            if same:
                self.budgets[int(pid)] = same[0]

    # ------------------------------------------------------------------ participant side
    def merged_total(self, pid: int, tuning: list[list[int]], num_experts: list[int]) -> int:
        """The participant's merged-group budget, clamped to what the layout allows."""
        return merged_group_total(self.budgets[pid].merged, tuning, num_experts)

    def local_update(self, ctx: RunContext, round_idx: int, pid: int, roles: Any, profile: Any) -> Update:
        from flux.moe import LayerLayout, estimate_memory
        from flux.moe.merged_view import FROZEN_FORMATS
        from flux.roles import activation_utilities

        cfg, handle = ctx.cfg, ctx.work.handle
        frozen_bits = FROZEN_FORMATS[cfg.flux.frozen_format]
        layers = handle.moe_layers
        tuning = [sorted(t.tolist()) for t in roles.tuning]
        zo = cfg.flux.exploration == "zo"
        explore = [sorted(x.tolist()) for x in roles.exploration] if zo else [[] for _ in layers]
        num_experts = [layer.num_experts for layer in layers]
        with self.session(ctx, round_idx, pid) as s:
            # the measured budget policy ran on this participant before its first round
            s.overhead_s += self.charged_now.get(pid, 0.0)
            with s.overhead():
                # the participant's copies: its non-tuning experts came as int-N (download_bits)
                plans = install_participant_view(handle, cfg, tuning, profile,
                                                 self.merged_total(pid, tuning, num_experts), frozen_tuning=explore)
            s.begin()
            tracker = _GradTracker(layers)
            explorer = _ZerothOrderExplorer(ctx.work.model, layers, explore, sigma=cfg.flux.zo_sigma,
                                            perturbations=cfg.flux.zo_perturbations, lr=round_lr(cfg, round_idx),
                                            generator=participant_generator(cfg.seed, round_idx, pid,
                                                                            Stream.ZEROTH_ORDER))
            measured_steps = cfg.flux.utility_steps or cfg.local_steps
            stats = s.train(micro_batches=cfg.flux.utility_micro_batches, micro_batch_steps=measured_steps,
                            on_micro_batch=tracker, on_step=explorer if explorer.rows else None,
                            optimizer=cfg.flux.optimizer)
            with s.overhead():
                # Eq. 3 sums over every trained sample: extrapolate from the measured steps
                tracker.scale = cfg.local_steps / min(measured_steps, cfg.local_steps)
                deltas, tokens = s.view_deltas(routed_only=False,
                                               extra={l: explorer.weights(l) for l in range(len(layers))})
                utilities = self._utilities(profile, stats.samples, tracker, layers)
                utilities.update(explorer.utilities(profile, stats.samples))
                shares = activation_utilities(profile.frequencies())
                tuned_share = float(sum(float(shares[l][e]) for l, e in utilities))
                dense_deltas = s.dense_deltas()
                layouts = [LayerLayout(tuned=p.num_tuning, merged_groups=p.num_groups - p.num_tuning,
                                       quantize_bits=frozen_bits, keep_originals=False) for p in plans]
                peak = estimate_memory(handle, layouts, optimizer=cfg.flux.optimizer, train_experts=False,
                                       trainable=list(s.dense.values())).total
            return s.upload(stats, deltas, tokens, dense_deltas=dense_deltas, peak_memory_bytes=peak,
                            utilities=utilities, profile=profile, tuned_share=tuned_share,
                            num_tuning=sum(len(t) for t in tuning),
                            num_merged=sum(p.num_groups - p.num_tuning for p in plans))

    @staticmethod
    def _utilities(profile, samples: list[int], tracker: "_GradTracker", layers) -> dict:
        """Eq. 3 per backprop-tuned expert: sqrt(|D_e| * sum_k ||g_k||^2)."""
        from flux.roles.utility import utility_from_sums

        routed = routed_sample_counts(profile, samples)
        if routed is None:  # no trained sample was profiled: nothing measured, keep the predictions
            return {}
        out = {}
        for l, layer in enumerate(layers):
            view = layer.view
            if view is None:
                continue
            for g, e in enumerate(view.tuned_experts):
                d_e = float(routed[l][e])
                sq = tracker.scale * tracker.sq_norms[l][g] if tracker.sq_norms.get(l) is not None else 0.0
                out[(l, e)] = utility_from_sums(d_e, float(sq))
        return out


def most_activated(profile, tune: int) -> list[list[int]]:
    """Per MoE layer, the sorted ids of the ``tune`` most-activated experts of ``profile`` over
    all layers (the round-1 roles, before any utility was measured)."""
    from flux.roles import activation_utilities
    from flux.roles.assignment import select_top_b

    return [sorted(t.tolist()) for t in select_top_b(activation_utilities(profile.frequencies()), tune)]


def merged_group_total(budget: int, tuning: list[list[int]], num_experts: list[int]) -> int:
    """A merged-group budget clamped to the layout: at least one group per layer that has a
    non-tuning expert, at most one group per non-tuning expert (no merging)."""
    non_tuning = [e - len(t) for e, t in zip(num_experts, tuning)]
    low = sum(1 for n in non_tuning if n > 0)
    return max(low, min(budget, sum(non_tuning)))


def install_participant_view(handle, cfg, tuning: list[list[int]], profile, merged_total: int, *,
                             frozen_tuning: Optional[list[list[int]]] = None) -> list:
    """Install a participant's merged view (Eq. 1/2): ``tuning`` (per MoE layer, expert ids) stay
    trainable at full precision, every other expert is merged from its int-``download_bits`` copy
    into ``merged_total`` groups stored in ``flux.frozen_format``, by the ``profile``'s activation
    frequencies and attention scores.  The originals stay under the view
    (``uninstall(handle, write_back=False)`` restores them).  Returns the per-layer merge plans."""
    from flux.merging.install import merge_model
    from flux.moe.merged_view import FROZEN_FORMATS

    return merge_model(handle, tuning, profile.frequencies(), profile.attention_scores(),
                       stacks=participant_stacks(handle, tuning, cfg.download_bits), total_budget=merged_total,
                       mode=cfg.flux.merge_mode, clustering=cfg.flux.merge_clustering, seed=cfg.seed,
                       frozen_tuning=frozen_tuning, quantize_bits=FROZEN_FORMATS[cfg.flux.frozen_format])


def participant_stacks(handle, tuning: list[list[int]], bits: int) -> Optional[list[dict[str, Tensor]]]:
    """Per MoE layer the expert stacks the participant holds (``layer_weight_stacks`` keys):
    tuning experts in full precision, every other expert's weights as its int-``bits`` download
    (:func:`flux.federation.downloads.readonly_copy`); None when ``bits`` is 0 (the originals)."""
    from flux.federation.downloads import readonly_copy
    from flux.merging.install import layer_weight_stacks

    if not bits:
        return None
    out = []
    for stacks, tuned in zip(layer_weight_stacks(handle), tuning):
        read_only = torch.tensor([e for e in range(stacks["gate_up"].shape[0]) if e not in set(tuned)],
                                 dtype=torch.long)
        copy = dict(stacks)
        for k in ("gate_up", "down"):  # biases come in full precision
            w = stacks[k].clone()
            if read_only.numel():
                w[read_only] = readonly_copy(w[read_only], bits)
            copy[k] = w
        out.append(copy)
    return out


def routed_sample_counts(profile, samples: list[int]) -> Optional[list[Tensor]]:
    """|D_e| of Eq. 3 per layer, float64 [E_l]: how many of the trained ``samples`` the profile
    routes at least one token to expert e; None when the profile saw none of them.

    A profile of a sample of the local data (``flux.profile_samples``; ``profile.indices`` are its
    rows) knows the routing only of the trained samples it also profiled: their count is scaled by
    len(trained) / |profiled & trained|.  For a profile of all the data the scale is exactly 1:
    the paper's count.
    """
    seen = torch.tensor(sorted(set(samples)), dtype=torch.long)
    profiled = getattr(profile, "indices", None)  # None: a profile pickled before the field existed
    hit = seen if profiled is None else seen[torch.isin(seen, profiled)]
    if hit.numel() == 0:
        return None
    scale = seen.numel() / hit.numel()
    out = []
    for prof in profile.layers:
        if prof.sample_tokens.shape[0]:
            out.append((prof.sample_tokens[hit] > 0).sum(0).double() * scale)
        else:  # a profile that saw no sample at all
            out.append(torch.zeros(prof.num_experts, dtype=torch.float64))
    return out


class _ZerothOrderExplorer:
    """Forward-only (SPSA) updates of exploration experts installed as frozen groups.

    After every optimizer step: g = mean_j (L(W + xi_j) - L(W)) / sigma^2 xi_j on the same
    mini-batch (``flux.roles.spsa_gradient``, all exploration experts perturbed together), then
    W <- W - lr g.  No weight-gradient of these experts is ever computed.  Their utility uses
    Sum_k ||g_k||^2 ~ (B ||g||)^2 * n / (n + d + 1): the factor removes the noise that inflates
    an n-sample estimate's squared norm in dimension d (E||g_hat||^2 = ||g||^2 (n + d + 1) / n
    for Gaussian perturbations and a linear loss).
    """

    def __init__(self, model, layers, explore: list[list[int]], *, sigma: float, perturbations: int, lr: float,
                 generator: torch.Generator) -> None:
        self.model, self.layers = model, layers
        self.sigma, self.n, self.lr, self.generator = sigma, perturbations, lr, generator
        self.rows = [(l, e) for l, ex in enumerate(explore) for e in ex]
        self.sq: dict[tuple[int, int], float] = {}

    def _live(self) -> dict[str, Tensor]:
        out = {}
        for l, e in self.rows:
            view = self.layers[l].view
            w = view.group_weights(view.expert_to_group[e])  # shares storage with the frozen stack
            out[f"{l}.{e}.gate_up"], out[f"{l}.{e}.down"] = w.gate_up, w.down
        return out

    def __call__(self, batch: dict) -> None:
        from flux.federation.local import task_loss
        from flux.roles import spsa_gradient

        live = self._live()
        base = {k: t.clone() for k, t in live.items()}

        def loss_at(ws: dict) -> Tensor:
            for k, t in live.items():
                t.copy_(ws[k])
            return task_loss(self.model, batch)

        with torch.no_grad():
            est = spsa_gradient(loss_at, base, sigma=self.sigma, num_perturbations=self.n, generator=self.generator)
            for k, t in live.items():
                t.copy_(base[k] - self.lr * est[k])
        b = batch["input_ids"].shape[0]
        for l, e in self.rows:
            g = [est[f"{l}.{e}.gate_up"], est[f"{l}.{e}.down"]]
            d = sum(x.numel() for x in g)
            sq = sum(float(x.double().pow(2).sum()) for x in g) * self.n / (self.n + d + 1)
            self.sq[(l, e)] = self.sq.get((l, e), 0.0) + sq * b * b

    def weights(self, layer: int) -> dict:
        view = self.layers[layer].view
        return {e: view.group_weights(view.expert_to_group[e]) for l, e in self.rows if l == layer}

    def utilities(self, profile, samples: list[int]) -> dict:
        from flux.roles.utility import utility_from_sums

        routed = routed_sample_counts(profile, samples)
        if routed is None:
            return {}
        out = {}
        for l, e in self.rows:
            d_e = float(routed[l][e])
            out[(l, e)] = utility_from_sums(d_e, self.sq.get((l, e), 0.0))
        return out


class _GradTracker:
    """After each micro-batch: sum over micro-batches of ||B * (grad increment)||^2 per tuning group."""

    def __init__(self, layers) -> None:
        self.layers = layers
        self.prev: dict[int, list[Tensor]] = {}
        self.sq_norms: dict[int, Tensor] = {}
        self.scale = 1.0  # measured steps -> all steps (flux.utility_steps)

    def __call__(self, micro_batch: dict, batch_size: int, index: int) -> None:
        for l, layer in enumerate(self.layers):
            view = layer.view
            if view is None or view.num_tuned == 0:
                continue
            grads = [p.grad for p in view.trainable_parameters()]
            if any(g is None for g in grads):
                continue
            # grads hold the step's running sum; they were zeroed before micro-batch 0
            cur = [g.detach().clone() for g in grads]
            inc = cur if index == 0 else [c - p for c, p in zip(cur, self.prev[l])]
            sq = sum((i.float() * batch_size).pow(2).flatten(1).sum(1) for i in inc)
            self.sq_norms[l] = self.sq_norms.get(l, torch.zeros_like(sq)) + sq
            self.prev[l] = cur
