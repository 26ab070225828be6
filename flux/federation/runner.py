"""The round loop of a federated run (``flux run``).

Every rank executes the same loop on the same inputs; only the participants differ (rank r
trains the sampled participants at positions r, r + W, ... of the round's sorted sample).  The
server's decisions (sampling, dropout, roles, aggregation) are computed identically on every rank
from gathered data, so no rank has to broadcast decisions (one exception: whether a
``sim_budget_s`` is spent, which the lead's clock decides, a rank timing its own aggregation), and
W = 1 and W = 2 give bit-identical global weights in deterministic mode (single-threaded kernels,
fixed summation order).

A round (:meth:`Run.round`) is a short sequence of named steps; the method
(:class:`flux.methods.api.Method`) owns the decisions and the aggregation:

    sample -> profiles (stale: computed during round r-1 on its starting model) -> method.plan ->
    participant work (method.local_update) -> admission (validation, deadline, dropouts) ->
    method.aggregate -> apply -> method.observe -> clock -> evaluate (rank 0) -> report ->
    atomic checkpoint.

docs/architecture.md maps every step and equation to its file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from flux.federation import distributed as fd
from flux.federation.config import ConfigError, RunConfig, config_to_toml
from flux.federation.errors import RunDirectoryInUse
from flux.federation.rng import Stream, participant_generator
from flux.federation.update import Failure, Update
from flux.federation.workload import all_threads


class RankFailure(RuntimeError):
    """A collective failed: another rank died or stopped answering within faults.rank_timeout_s."""


# ---------------------------------------------------------------------------- deterministic draws
def _uniform(seed: int, round_idx: int, pid: int, stream: Stream) -> float:
    return float(torch.rand(1, generator=participant_generator(seed, round_idx, pid, stream)))


def sample_participants(cfg: RunConfig, round_idx: int) -> list[int]:
    """The round's participants: a seeded draw without replacement, sorted."""
    gen = participant_generator(cfg.seed, round_idx, 0, Stream.PARTICIPANT_SAMPLING)
    return sorted(torch.randperm(cfg.participants, generator=gen)[: cfg.participants_per_round].tolist())


def dropped_participants(cfg: RunConfig, round_idx: int, sampled: list[int]) -> list[int]:
    """Simulated dropout: each sampled participant fails this round with probability faults.dropout."""
    if cfg.faults.dropout <= 0:
        return []
    return [pid for pid in sampled if _uniform(cfg.seed, round_idx, pid, Stream.DROPOUT) < cfg.faults.dropout]


def profile_sample(num_samples: int, limit: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    """Which of ``num_samples`` local samples to profile (``flux.profile_samples = limit``):
    None = all of them (``limit`` 0 or >= ``num_samples``), else ``limit`` drawn without
    replacement from ``generator``, sorted (int64)."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit == 0 or limit >= num_samples:
        return None
    return torch.randperm(num_samples, generator=generator)[:limit].sort().values


def profile_batches(data, indices: Optional[torch.Tensor], batch_size: int = 64) -> Iterator[dict]:
    """Unshuffled batches of ``data`` (an ``EncodedDataset``) for profiling: all of it when
    ``indices`` is None, else the rows at ``indices`` with ``batch["index"]`` still the samples'
    positions in ``data`` (profiles are indexed by local sample position)."""
    if indices is None:
        yield from data.batches(batch_size, shuffle=False, generator=None)
        return
    for batch in data.subset(indices).batches(batch_size, shuffle=False, generator=None):
        yield {**batch, "index": indices[batch["index"]]}


def my_share(sampled: list[int], rank: int, world: int) -> list[int]:
    return [pid for i, pid in enumerate(sampled) if i % world == rank]


def model_sha256(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer, by name, in sorted order (bitwise identity of runs)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------- the run
@dataclasses.dataclass
class RunState:
    """What a checkpoint restores."""

    next_round: int = 0
    wall_s: float = 0.0
    sim_s: float = 0.0
    profiles: dict = dataclasses.field(default_factory=dict)
    # download accounting: the round each participant last received the global model, and the
    # global tensors each round changed (a participant fetches only what changed since its sync)
    last_sync: dict = dataclasses.field(default_factory=dict)
    changed: dict = dataclasses.field(default_factory=dict)
    # download_bits > 0: per participant, each tensor's copy (flux/federation/downloads.py)
    holdings: dict = dataclasses.field(default_factory=dict)


def configure_threads(cfg: RunConfig) -> None:
    if cfg.deterministic:
        # Bitwise reproducibility across rank layouts: kernels must not split reductions by thread.
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)


class Run:
    """One rank's view of a run; :meth:`execute` runs the remaining rounds."""

    def __init__(self, cfg: RunConfig, out_dir: Path, *, resume: bool, progress: bool) -> None:
        from flux.federation.clock import SimClock, measure_matmul_flops
        from flux.federation.devices import participant_profiles
        from flux.federation.report import RunReporter
        from flux.federation.workload import build_workload
        from flux.methods.api import RunContext
        from flux.methods.registry import make_method

        self.cfg = cfg
        self.out = out_dir
        self.rank, self.world = fd.rank_and_world()
        self.lead = self.rank == 0
        self.reporter = RunReporter(out_dir, lead=self.lead, progress=progress, tensorboard=cfg.log.tensorboard)
        try:  # first: a user's "module:Class" that does not import is reported before any work
            self.method = make_method(cfg.method)
        except ValueError as exc:
            raise ConfigError("method", str(exc)) from exc
        self.work = build_workload(cfg, progress=self.reporter.progress)
        self.devices = participant_profiles(cfg.devices, cfg.participants, self.work.model_params)
        # One throughput for all ranks (rank 0's), so the simulated clock does not depend on layout.
        self.machine_flops = fd.broadcast(measure_matmul_flops() if self.lead else None)
        self.clock = SimClock(self.machine_flops)
        self.ctx = RunContext(cfg=cfg, work=self.work, devices=self.devices, rank=self.rank, world=self.world)
        try:
            self.method.setup(self.ctx)
        except ValueError as exc:  # a budget the devices cannot meet: a config problem
            raise ConfigError("devices", f"{cfg.method} cannot run on these devices: {exc}") from exc
        for line in self.method.setup_lines(self.ctx):
            self.reporter.notice(line)
        self.sizes = self._tensor_sizes()
        self.quantized_sizes = self._quantized_expert_sizes(cfg.download_bits)
        # per tensor, one broadcast round delta's packed bytes (empty without broadcast_bits)
        self.delta_sizes = self._tensor_sizes(cfg.broadcast_bits) if cfg.broadcast_bits else {}
        self.trained: dict[int, Optional[set]] = {}  # this round's trained experts per participant
        self.probe_profile = None  # routing of the global model on the probe data, last evaluation
        self.state = RunState()
        self.ended = False  # the last round ran: `rounds`, or the simulated-time budget
        self.profiler = None
        self.pending: dict[int, Any] = {}  # pid -> Future[ModelProfile] for the next round
        if resume:
            self._restore()
        self.reporter.start(config_to_toml(cfg), self.state.next_round)

    # ------------------------------------------------------------------ checkpoints
    def _restore(self) -> None:
        from flux.federation.checkpoint import load_latest, set_rng_state

        found = load_latest(self.out)
        if found is None:
            self.reporter.notice(f"no checkpoint in {self.out}/checkpoints; starting from round 1")
            return
        _, state = found
        self.work.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.state = RunState(next_round=state["next_round"], wall_s=state["wall_s"], sim_s=state["sim_s"],
                              profiles=state.get("profiles", {}), last_sync=state["last_sync"],
                              changed=state["changed"], holdings=state.get("holdings", {}))
        if "rng" in state:
            set_rng_state(state["rng"])
        self.reporter.notice(f"resumed from round {self.state.next_round} ({self.out}/checkpoints)")

    def _checkpoint(self, next_round: int, profiles: dict, last: bool) -> None:
        from flux.federation.checkpoint import rng_state, save_checkpoint

        if not self.lead:
            return
        state = {"model": self.work.model.state_dict(), "method": self.method.state_dict(), "next_round": next_round,
                 "wall_s": self.state.wall_s, "sim_s": self.state.sim_s, "profiles": profiles, "rng": rng_state(),
                 "last_sync": self.state.last_sync, "changed": self.state.changed,
                 "holdings": self.state.holdings}
        if self.cfg.checkpoint.every and (next_round % self.cfg.checkpoint.every == 0 or last):
            save_checkpoint(self.out, next_round, state, keep=self.cfg.checkpoint.keep)

    # ------------------------------------------------------------------ downloads
    def _tensor_sizes(self, bits: int = 0) -> dict:
        """Bytes of every global tensor a round can change: (layer, expert) and dense names; with
        ``bits`` > 0 the packed bytes of one int-``bits`` broadcast round delta of each."""
        from flux.federation.compression import packed_bytes

        def nbytes(tensors) -> int:
            return sum(packed_bytes(t.shape, bits, t.element_size()) for t in tensors if t is not None)

        sizes = {}
        for l, layer in enumerate(self.work.handle.moe_layers):
            for e in range(layer.num_experts):
                w = layer.expert_weights(e)
                sizes[(l, e)] = nbytes((w.gate_up, w.down, w.gate_up_bias, w.down_bias))
        for name, p in self.method.dense_parameters(self.ctx).items():
            sizes[name] = nbytes((p,))
        return sizes

    def _quantized_expert_sizes(self, bits: int) -> dict:
        """Bytes of each expert's int-``bits`` copy (weights packed as profiling packs them,
        biases in full precision); empty when ``bits`` is 0."""
        from flux.federation.downloads import GROUP_SIZE
        from flux.ops import quantize

        if not bits:
            return {}
        sizes = {}
        with torch.no_grad():
            for l, layer in enumerate(self.work.handle.moe_layers):
                for e in range(layer.num_experts):
                    w = layer.expert_weights(e)
                    packed = sum(quantize(t.detach().float(), bits, GROUP_SIZE).nbytes for t in (w.gate_up, w.down))
                    sizes[(l, e)] = packed + sum(t.numel() * t.element_size() for t in (w.gate_up_bias, w.down_bias)
                                                 if t is not None)
        return sizes

    def download_bytes(self, pid: int, round_idx: int) -> int:
        """What participant ``pid`` fetches at the start of ``round_idx``: the whole model the first
        time, afterwards the global tensors changed since its last sync (it keeps its copy); with
        ``download_bits`` the experts it does not train come quantized (flux/federation/downloads.py)."""
        from flux.methods.uploads import model_weight_bytes

        if self.quantized_sizes:
            from flux.federation.downloads import download_bytes, last_changes

            return download_bytes(self.state.holdings.get(pid), full_sizes=self.sizes,
                                  quantized_sizes=self.quantized_sizes, trained=self.trained.get(pid),
                                  last_change=last_changes(self.state.changed, round_idx),
                                  other_bytes=model_weight_bytes(self.work.model) - sum(self.sizes.values()),
                                  delta_sizes=self.delta_sizes, changed=self.state.changed, round_idx=round_idx)
        last = self.state.last_sync.get(pid)
        if last is None:
            return model_weight_bytes(self.work.model)
        keys = set().union(*(self.state.changed.get(r, set()) for r in range(last, round_idx)))
        if not self.delta_sizes:
            return int(sum(self.sizes[k] for k in keys))
        from flux.federation.downloads import changes_since

        # it holds everything in full precision as of round `last`: the missed round deltas or
        # the tensor, whichever is smaller
        return int(sum(min(self.sizes[k], changes_since(self.state.changed, k, last, round_idx) * self.delta_sizes[k])
                       for k in keys))

    # ------------------------------------------------------------------ profiles
    def _profile_inputs(self, pid: int, round_idx: int) -> tuple[Iterator[dict], int]:
        """The batches participant ``pid`` profiles for round ``round_idx`` (a seeded sample of
        its data when ``flux.profile_samples`` > 0) and its number of local samples."""
        data = self.work.train[pid]
        # seeded by the round the profile is for, so a stale and a fresh profile sample alike
        indices = profile_sample(len(data), self.cfg.flux.profile_samples,
                                 participant_generator(self.cfg.seed, round_idx, pid, Stream.PROFILE_SAMPLE))
        return profile_batches(data, indices), len(data)

    def _profile_now(self, pid: int, round_idx: int):
        from flux.profiling import profile_model

        batches, n = self._profile_inputs(pid, round_idx)
        return profile_model(self.work.model.backbone, batches, bits=self.cfg.flux.profile_bits, num_samples=n)

    def _submit_profiles(self, round_idx: int) -> None:
        """Stale profiling: start round ``round_idx``'s profiles now, on the current global model.

        Called in round ``round_idx - 1`` right after its profiles were taken and before any local
        training, so the model profiled is round ``round_idx - 1``'s *starting* model: a participant
        idle in that round had all of it to profile (``flux.hide_idle_profiling``)."""
        from flux.profiling import StaleProfiler

        if self.profiler is None:
            self.profiler = StaleProfiler()
        sampled = sample_participants(self.cfg, round_idx)
        for pid in my_share(sampled, self.rank, self.world):
            batches, n = self._profile_inputs(pid, round_idx)
            self.pending[pid] = self.profiler.submit(self.work.model.backbone, batches,
                                                     bits=self.cfg.flux.profile_bits, num_samples=n)

    def _profiles_for(self, round_idx: int, sampled: list[int]) -> dict:
        mine = {}
        for pid in my_share(sampled, self.rank, self.world):
            if pid in self.state.profiles:
                mine[pid] = self.state.profiles.pop(pid)
            elif pid in self.pending:
                mine[pid] = self.pending.pop(pid).result()
            else:
                mine[pid] = self._profile_now(pid, round_idx)
        return fd.all_gather_dict(mine)

    def _collect_pending(self) -> dict:
        """Wait for the next round's profiles (they go into the checkpoint)."""
        done = {pid: fut.result() for pid, fut in self.pending.items()}
        self.pending = {}
        return fd.all_gather_dict(done)

    # ------------------------------------------------------------------ routing drift
    def _probe_batches(self, per_participant: int = 32):
        """The first ``per_participant`` training samples of every participant (all local tasks),
        with indices made unique."""
        offset = 0
        for data in self.work.train:
            part = data.subset(range(min(per_participant, len(data))))
            for batch in part.batches(64, shuffle=False, generator=None):
                yield {**batch, "index": batch["index"] + offset}
            offset += len(part)

    def _routing_drift(self) -> Optional[float]:
        """How much the global model's routing moved since the last evaluation: the relative L1
        distance of full-precision expert frequencies on the probe data (the ablation's
        ``stale_profiling_error``, measured on the real run; the paper reports < 0.02)."""
        from flux.profiling import profile_model

        current = profile_model(self.work.model.backbone, self._probe_batches(), bits=None, attention=False)
        drift = current.relative_l1(self.probe_profile) if self.probe_profile is not None else None
        self.probe_profile = current
        return drift

    # ------------------------------------------------------------------ one round
    def round(self, r: int) -> dict:
        """Round ``r`` (0-based): the steps of the module docstring; returns its metrics record."""
        t0 = time.perf_counter()
        sampled, dropped = self._sample(r)
        profiles = self._round_profiles(r, sampled)
        plans = self.method.plan(self.ctx, r, sampled, profiles)
        if self.quantized_sizes:
            self.trained = {pid: self.method.trained_experts(self.ctx, r, pid, plans[pid], profiles.get(pid))
                            for pid in sampled if pid not in dropped}
        updates, lost = self._participant_work(r, sampled, dropped, plans, profiles)
        admitted = self._admit(r, updates, dropped, lost)
        t_agg = time.perf_counter()
        delta = self.method.aggregate(self.ctx, r, admitted.accepted, admitted.failures)
        self._apply(r, delta, sampled, dropped)
        self.method.observe(self.ctx, r, admitted.accepted)
        timing = self._round_timing(r, admitted, time.perf_counter() - t_agg)
        # the lead's clock decides (a rank times its own aggregation, so clocks differ slightly)
        last = bool(fd.broadcast(r + 1 == self.cfg.rounds or self._budget_spent(self.state.sim_s + timing.round_s)))
        self.ended = last
        result = self._evaluate(r, last)
        next_profiles = self._collect_pending() if (self.pending or self.world > 1) and self.method.needs_profiles else {}
        self.state.sim_s += timing.round_s
        self.state.wall_s += time.perf_counter() - t0
        record = self._record(r, sampled, admitted, timing, result)
        self.reporter.round(record)
        self.state.profiles = next_profiles
        self._checkpoint(r + 1, next_profiles, last)
        return record

    def _budget_spent(self, sim_s: float) -> bool:
        """Whether the simulated clock has reached ``sim_budget_s`` (never without a budget)."""
        return bool(self.cfg.sim_budget_s) and sim_s >= self.cfg.sim_budget_s

    def _sample(self, r: int) -> tuple[list[int], set[int]]:
        """The round's sampled participants and those of them that drop out."""
        sampled = sample_participants(self.cfg, r)
        return sampled, set(dropped_participants(self.cfg, r, sampled))

    def _round_profiles(self, r: int, sampled: list[int]) -> dict:
        """Every sampled participant's activation profile (methods that need one), and the
        next round's stale profiles started."""
        if not self.method.needs_profiles:
            return {}
        profiles = self._profiles_for(r, sampled)
        if self.cfg.flux.stale_profiling and r + 1 < self.cfg.rounds:
            self._submit_profiles(r + 1)
        return profiles

    def _participant_work(self, r: int, sampled: list[int], dropped: set[int], plans: dict,
                          profiles: dict) -> tuple[list[Update], list[Failure]]:
        """This rank's share of the participants' local rounds, gathered from every rank; a rank
        whose payload does not decode loses its participants' updates (failures)."""
        from flux.federation.aggregate import gather_updates

        local = [self.method.local_update(self.ctx, r, pid, plans[pid], profiles.get(pid))
                 for pid in my_share(sampled, self.rank, self.world) if pid not in dropped]
        lost: list[Failure] = []

        def bad_rank(rank: int, error: Exception) -> None:
            for pid in my_share(sampled, rank, self.world):
                if pid not in dropped:
                    lost.append(Failure(pid, "rejected", f"undecodable payload: {error}"))

        return gather_updates(local, on_bad_rank=bad_rank), lost

    def _admit(self, r: int, updates: list[Update], dropped: set[int], lost: list[Failure] = ()) -> "Admission":
        """Validate each update (shapes, finiteness, counts), price it on its device's clock, and
        turn away the ones that miss the deadline; dropouts are failures too."""
        from flux.federation.aggregate import validate_update
        from flux.federation.clock import ParticipantTime
        from flux.federation.robust import bound_updates, max_delta_rms_ratio

        cfg, handle = self.cfg, self.work.handle
        layer0 = handle.moe_layers[0]
        h, i = layer0.hidden_size, layer0.intermediate_size
        expert_shapes = {"gate_up": torch.Size([2 * i, h]), "down": torch.Size([h, i])}
        if layer0.source.has_bias:
            expert_shapes.update(gate_up_bias=torch.Size([2 * i]), down_bias=torch.Size([h]))
        num_experts = [layer.num_experts for layer in handle.moe_layers]
        dense_shapes = {k: p.shape for k, p in self.method.dense_parameters(self.ctx).items()}
        out = Admission(failures=[Failure(pid, "dropout", "dropped out") for pid in sorted(dropped)] + list(lost))
        for f in lost:
            self.reporter.notice(f"round {r + 1}: rejected participant {f.participant}: {f.reason}")
        stale = self.method.needs_profiles and cfg.flux.stale_profiling and r > 0
        valid = []
        for u in updates:
            reason = validate_update(u, expert_shapes, dense_shapes, num_experts=num_experts)
            if reason is None and u.costs is None:
                reason = "the update carries no costs record"
            if reason is not None:
                out.failures.append(Failure(u.participant, "rejected", reason))
                self.reporter.notice(f"round {r + 1}: rejected the update of participant {u.participant}: {reason}")
                continue
            valid.append(u)
        out.delta_rms_ratio_max = max_delta_rms_ratio(valid)
        out.bounded = bound_updates(valid, max_delta_rms_ratio=cfg.faults.max_delta_rms_ratio,
                                    action=cfg.faults.poison_action, max_samples=cfg.local_steps * cfg.batch_size,
                                    seq_len=cfg.dataset.seq_len)
        for pid in sorted({e["participant"] for e in out.bounded}):
            mine = [e for e in out.bounded if e["participant"] == pid]
            kinds = sorted({f"{e['check']} {e['action']}" for e in mine})
            self.reporter.notice(f"round {r + 1}: participant {pid}: {len(mine)} value(s) beyond the poisoning "
                                 f"bounds ({', '.join(kinds)}; metrics.jsonl 'bounded')")
        for u in valid:
            dev, costs = self.devices[u.participant], u.costs
            costs.bytes_down = self.download_bytes(u.participant, r)
            pt = ParticipantTime(
                download_s=self.clock.transfer(costs.bytes_down, dev.network_bytes_per_s),
                profile_s=self.clock.compute(costs.profile_s, dev),
                compute_s=self.clock.compute(costs.compute_s + costs.overhead_s, dev),
                offload_s=self.clock.transfer(costs.offload_bytes, dev.host_link_bytes_per_s),
                upload_s=self.clock.transfer(costs.bytes_up, dev.network_bytes_per_s),
            )
            total = pt.total if stale else pt.total + pt.profile_s
            if cfg.faults.deadline_s and total > cfg.faults.deadline_s:
                out.failures.append(Failure(u.participant, "deadline", f"missed the {cfg.faults.deadline_s} s deadline"))
                continue
            out.times[u.participant] = pt
            out.overhead_sim[u.participant] = self.clock.compute(costs.overhead_s, dev)
            out.accepted.append(u)
        return out

    def _apply(self, r: int, delta, sampled: list[int], dropped: set[int]) -> None:
        """Add the method's aggregate to the global model; record what changed (downloads)."""
        from flux.federation.aggregate import apply_expert_deltas
        from flux.federation.compression import compress_deltas

        if self.quantized_sizes:
            from flux.federation.downloads import after_download, last_changes

            last = last_changes(self.state.changed, r)
            for pid in sampled:
                if pid not in dropped:
                    self.state.holdings[pid] = after_download(
                        self.state.holdings.get(pid), r, keys=self.sizes, trained=self.trained.get(pid),
                        quantized_sizes=self.quantized_sizes, last_change=last, delta_sizes=self.delta_sizes,
                        changed=self.state.changed)
        experts, dense_delta = delta.experts, delta.dense
        if self.cfg.broadcast_bits:
            # the server applies exactly the int-N delta it broadcasts (flux/federation/compression.py)
            experts, dense_delta, _ = compress_deltas(experts, dense_delta, self.cfg.broadcast_bits)
        self.state.changed[r] = set(experts) | set(dense_delta)
        for pid in sampled:
            if pid not in dropped:
                self.state.last_sync[pid] = r
        apply_expert_deltas(self.work.handle, experts)
        dense = self.method.dense_parameters(self.ctx)
        with torch.no_grad():
            for name, d in dense_delta.items():
                dense[name].add_(d.to(dense[name].dtype))

    def _round_timing(self, r: int, admitted: "Admission", aggregation_s: float) -> "RoundTiming":
        """The round's simulated length (slowest accepted participant + aggregation), the
        profiling and method overhead on its critical path."""
        from flux.federation.clock import round_time, slowest_participant

        cfg = self.cfg
        stale = self.method.needs_profiles and cfg.flux.stale_profiling and r > 0
        # not sampled in round r-1: that whole round was free to profile round r-1's starting model
        hide_idle = stale and cfg.flux.hide_idle_profiling
        previous = set(sample_participants(cfg, r - 1)) if hide_idle else set()
        pts = list(admitted.times.values())
        idle = [hide_idle and pid not in previous for pid in admitted.times]
        round_s = round_time(pts, aggregation_s, stale_profiling=stale, idle_last_round=idle)
        slowest = slowest_participant(pts, aggregation_s, stale_profiling=stale, idle_last_round=idle)
        visible = 0.0 if slowest is None else pts[slowest].visible_profile_s(
            aggregation_s, stale_profiling=stale, idle_last_round=idle[slowest])
        # method overhead on the critical path: the slowest participant's visible profiling plus
        # its merging / role / utility work (simulated seconds of this round)
        critical = 0.0 if slowest is None else visible + admitted.overhead_sim[list(admitted.times)[slowest]]
        if cfg.faults.deadline_s and any(f.kind == "deadline" for f in admitted.failures):
            round_s = max(round_s, cfg.faults.deadline_s)
        return RoundTiming(round_s=round_s, profile_visible_s=visible, critical_overhead_s=critical)

    def _evaluate(self, r: int, last: bool) -> dict:
        """Test metrics (and routing drift) on evaluation rounds and the run's ``last`` round,
        computed on rank 0 and shared."""
        from flux.models import evaluate

        if not ((r + 1) % self.cfg.eval_every == 0 or last):
            return {"accuracy": None, "loss": None}
        result = None
        if self.lead:
            with all_threads():  # evaluation does not change the model: any thread count
                result = evaluate(self.work.model, self.work.test)
                result["routing_drift"] = self._routing_drift()
        return fd.broadcast(result)

    def _record(self, r: int, sampled: list[int], admitted: "Admission", timing: "RoundTiming", result: dict) -> dict:
        """The round's line of ``metrics.jsonl``."""
        from flux.federation.local import round_lr

        accepted = admitted.accepted
        costs = [u.costs for u in accepted]
        return {
            "round": r + 1, "wall_s": round(self.state.wall_s, 3), "sim_s": round(self.state.sim_s, 3),
            "accuracy": result["accuracy"], "loss": result["loss"],
            "train_loss": _mean([c.loss for c in costs]),
            "participants": sampled,
            "dropped": sorted({f.participant for f in admitted.failures}),
            "rejected": [{"participant": f.participant, "reason": f.reason} for f in admitted.failures
                         if f.kind != "dropout"],
            "bytes_up": int(sum(c.bytes_up for c in costs)),
            "bytes_down": int(sum(c.bytes_down for c in costs)),
            "peak_memory_bytes": int(max((c.peak_memory_bytes for c in costs), default=0)),
            "round_sim_s": round(timing.round_s, 4),
            "profile_visible_s": round(timing.profile_visible_s, 4),
            "critical_overhead_s": round(timing.critical_overhead_s, 4),
            "compute_s": round(sum(c.compute_s for c in costs), 4),
            "overhead_s": round(sum(c.overhead_s + c.profile_s for c in costs), 4),
            "offload_bytes": int(sum(c.offload_bytes for c in costs)),
            "lr": round_lr(self.cfg, r),
            # per accepted participant, its simulated phases: who straggled and on what
            "participant_s": {str(pid): {f.name.removesuffix("_s"): round(getattr(t, f.name), 3)
                                         for f in dataclasses.fields(t)}
                              for pid, t in admitted.times.items()},
            "participant_bytes": {str(u.participant): {"down": int(u.costs.bytes_down), "up": int(u.costs.bytes_up)}
                                  for u in accepted},
            "bounded": admitted.bounded,
            "delta_rms_ratio_max": (None if admitted.delta_rms_ratio_max is None
                                    else round(admitted.delta_rms_ratio_max, 4)),
            **{k: v for k, v in result.items() if k not in ("accuracy", "loss")},
        }

    def execute(self) -> Optional[dict]:
        cfg = self.cfg
        if self.state.next_round == 0:
            self._evaluate_base()
        self.reporter.open_progress(cfg.rounds, self.state.next_round, cfg.method)
        try:
            # a run resumed from the checkpoint of its budget's round has nothing left to run (the
            # checkpoint's clock is the lead's, the same on every rank)
            self.ended = self._budget_spent(self.state.sim_s)
            for r in range(self.state.next_round, cfg.rounds):
                if self.ended:
                    break
                self.round(r)
        finally:
            self.reporter.close_progress()
            if self.profiler is not None:
                self.profiler.close()
        return self.finish()

    def _evaluate_base(self) -> None:
        """The pretrained model's metrics before any federated round (``base.json``): the point
        every curve starts from, with the test set's majority-answer accuracy (the floor a model
        that learns only the answer prior reaches: :mod:`flux.models.majority`)."""
        from flux.models import evaluate
        from flux.models.majority import majority_accuracy

        if not self.lead:
            return
        with all_threads():
            base = evaluate(self.work.model, self.work.test)
            self._routing_drift()  # the reference for round 1's drift
        majority = majority_accuracy(self.work.test)
        if majority is not None:
            base["majority_accuracy"] = majority
        self.reporter.base(base)

    def finish(self) -> Optional[dict]:
        """The run's summary (lead rank; None elsewhere)."""
        if not self.lead:
            return None
        self.work.save_model(self.out / "model")  # model.save: the fine-tuned model in its transformers format
        facts = {
            "model_sha256": model_sha256(self.work.model),
            "world_size": self.world,
            "machine_flops": self.machine_flops,
            "devices": sorted({d.name for d in self.devices}),
            "model_params": self.work.model_params,
            "pretrain": {k: v for k, v in self.work.pretrain_info.items()
                         if isinstance(v, (int, float, str, bool)) or k == "quality"},
            "task": self.work.kind,
            "test_examples": len(self.work.test),
            "method_report": self.method.report(),
        }
        return self.reporter.finish(cfg=self.cfg, facts=facts)


@dataclasses.dataclass
class Admission:
    """Which updates of a round reach aggregation.

    Attributes:
        accepted: valid updates in time, ascending participant.
        failures: dropouts, rejected updates and missed deadlines.
        times: participant -> its simulated phases (:class:`flux.federation.clock.ParticipantTime`).
        overhead_sim: participant -> simulated seconds of its method overhead.
        bounded: the poisoning bounds' interventions (:func:`flux.federation.robust.bound_updates`).
        delta_rms_ratio_max: the largest expert-delta RMS over the round's median (the margin).
    """

    accepted: list = dataclasses.field(default_factory=list)
    failures: list = dataclasses.field(default_factory=list)
    times: dict = dataclasses.field(default_factory=dict)
    overhead_sim: dict = dataclasses.field(default_factory=dict)
    bounded: list = dataclasses.field(default_factory=list)
    delta_rms_ratio_max: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class RoundTiming:
    """A round's simulated seconds: its length, visible profiling and critical-path overhead."""

    round_s: float
    profile_visible_s: float
    critical_overhead_s: float


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ---------------------------------------------------------------------------- entry points
LOCK_FILE = ".flux-run.lock"


@contextlib.contextmanager
def run_directory_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.flux-run.lock`` (an exclusive, non-blocking ``flock``) for a run's lifetime:
    a second ``flux run`` on the same directory fails at once instead of interleaving two runs'
    checkpoints and metrics.  The kernel drops the lock when the process dies, so a crashed run
    never leaves a stale lock behind (``--resume`` just works)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd_ = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd_, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd_, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirectoryInUse(f"{out} is in use by another flux run (pid {holder}); wait for it, or choose "
                                    "another --out") from None
        os.ftruncate(fd_, 0)
        os.pwrite(fd_, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd_)  # releases the flock


def _rank_main(rank: int, world: int, init_method: Optional[str], cfg: RunConfig, out_dir: str, resume: bool,
               progress: bool) -> Optional[dict]:
    configure_threads(cfg)
    device = torch.device("cpu")
    fd.init_group(rank, world, timeout_s=cfg.faults.rank_timeout_s, device=device, init_method=init_method)
    try:
        # under torchrun no parent process holds the directory: rank 0 does
        lock = run_directory_lock(Path(out_dir)) if fd.under_torchrun() and rank == 0 else contextlib.nullcontext()
        with lock:
            return Run(cfg, Path(out_dir), resume=resume, progress=progress).execute()
    except RuntimeError as exc:
        if world > 1 and _is_collective_failure(exc):
            raise RankFailure(
                f"rank {rank}: a collective failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
                f"another rank probably died or stalled (faults.rank_timeout_s={cfg.faults.rank_timeout_s})") from exc
        raise
    finally:
        fd.shutdown()


def _is_collective_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "closed", "distbackend"))


def _spawned(rank: int, world: int, init_method: str, cfg: RunConfig, out_dir: str, resume: bool, progress: bool) -> None:
    _rank_main(rank, world, init_method, cfg, out_dir, resume, progress)


def run(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, nproc: int = 1,
        progress: bool = True) -> Optional[dict]:
    """Run (or resume) a federated job; returns the summary on the lead process.

    ``nproc`` > 1 spawns that many local ranks; under ``torchrun`` the launcher's ranks are used
    and ``nproc`` must be 1 (the default)."""
    out = Path(out_dir)
    if fd.under_torchrun():
        if nproc not in (1, None):
            raise ValueError("under torchrun the launcher sets the ranks: drop --nproc")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return _rank_main(rank, world, None, cfg, str(out), resume, progress)
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    with run_directory_lock(out):
        if nproc == 1:
            return _rank_main(0, 1, None, cfg, str(out), resume, progress)
        fd.spawn(_spawned, nproc, (cfg, str(out), resume, progress))
    return json.loads((out / "summary.json").read_text())  # written by rank 0
