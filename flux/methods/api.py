"""The public method API: what a federated fine-tuning method is to the engine.

A method is a strategy the engine consults once per round (``flux/federation/runner.py``):

1. :meth:`Method.plan`: the server's decision for the round's sampled participants (every rank
   computes it from the same inputs, so nothing is broadcast);
2. :meth:`Method.local_update`: one participant's work on the global model, returning an
   :class:`~flux.federation.update.Update` (it must leave the global model untouched);
3. :meth:`Method.aggregate`: the accepted updates (and the round's failures) -> the
   :class:`~flux.federation.update.RoundDelta` added to the global model; default: expert-wise
   FedAvg;
4. :meth:`Method.observe`: server-side state after aggregation (e.g. FLUX's utilities).

:meth:`Method.setup` runs once (budgets from each participant's device);
:meth:`Method.state_dict` / :meth:`Method.load_state_dict` make the method's state part of the
run's checkpoint.  A user's own method is a subclass named ``"module:Class"`` in the config.

This module imports no concrete method.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, TypeVar

from torch import nn

from flux.federation.update import Failure, RoundDelta, Update


@dataclasses.dataclass
class RunContext:
    """What a method may use.

    Attributes:
        cfg: the resolved ``RunConfig``.
        work: the ``Workload`` (global model, handle, participant data, test set).
        devices: per participant its scaled ``DeviceProfile``.
        rank, world: process-group position (0, 1 without a group).
    """

    cfg: Any
    work: Any
    devices: list
    rank: int = 0
    world: int = 1


T = TypeVar("T")


def per_device_memory(ctx: RunContext, build: Callable[[int], T]) -> dict[int, T]:
    """``build(memory_bytes)`` once per distinct device memory; returns participant -> result
    (participants of one device class share one plan or budget)."""
    by_memory: dict[int, T] = {}
    out = {}
    for pid, dev in enumerate(ctx.devices):
        memory = int(dev.memory_bytes)
        if memory not in by_memory:
            by_memory[memory] = build(memory)
        out[pid] = by_memory[memory]
    return out


class Method:
    """Base class of every method: override what differs, set ``name``.

    Attributes:
        name: the method's name in metrics and tables.
        needs_profiles: whether the engine must profile each sampled participant's expert
            activations (quantized forward pass) and pass the profile to :meth:`plan` and
            :meth:`local_update`.
        own_config_keys: dotted config keys that only this method reads: a run of any other
            method is the same run whatever they hold, so ``flux bench`` reuses it across a
            change of them (a new FLUX default does not invalidate the baselines' runs).
    """

    name: str = "base"
    needs_profiles: bool = False
    own_config_keys: tuple[str, ...] = ()

    # ------------------------------------------------------------------ the round
    def setup(self, ctx: RunContext) -> None:
        """Once per run, before round 1 (e.g. budgets from device memory).  Raise ValueError
        when a participant's device cannot run the method (reported as a config error)."""

    def setup_lines(self, ctx: RunContext) -> list[str]:
        """What :meth:`setup` decided, as one-line notices for the user (e.g. the budgets)."""
        return []

    def report(self) -> dict:
        """The method's decisions for ``summary.json`` (``method_report``; numbers, strings and
        containers of them); empty by default."""
        return {}

    def plan(self, ctx: RunContext, round_idx: int, sampled: list[int], profiles: dict[int, Any]) -> dict[int, Any]:
        """Per sampled participant, what the server tells it this round (None by default)."""
        return {pid: None for pid in sampled}

    def local_update(self, ctx: RunContext, round_idx: int, pid: int, plan: Any, profile: Any) -> Update:
        """Participant ``pid``'s round on the global model (left untouched afterwards)."""
        raise NotImplementedError(f"{type(self).__name__} must implement local_update")

    def aggregate(self, ctx: RunContext, round_idx: int, accepted: Sequence[Update],
                  failures: Sequence[Failure]) -> RoundDelta:
        """The round's change to the global model from its accepted updates.

        Default: expert-wise FedAvg (:func:`flux.federation.aggregate.aggregate`); experts
        nobody updated keep their weights; ``failures`` (dropouts, rejected updates, missed
        deadlines) carry no weight.
        """
        from flux.federation.aggregate import aggregate

        experts, dense = aggregate(accepted)
        return RoundDelta(experts=experts, dense=dense)

    def trained_experts(self, ctx: RunContext, round_idx: int, pid: int, plan: Any,
                        profile: Any) -> Optional[set[tuple[int, int]]]:
        """The ``(layer, expert)`` keys participant ``pid`` trains this round (its ``plan`` and
        ``profile`` as :meth:`local_update` gets them).  With ``download_bits`` > 0 every other
        expert is fetched as a quantized copy, so the method must only *read* those (merge,
        profile, drop), never train them.  Default None: every expert in full precision."""
        return None

    def observe(self, ctx: RunContext, round_idx: int, accepted: Sequence[Update]) -> None:
        """Server-side bookkeeping after the aggregate was applied."""

    def state_dict(self) -> dict:
        """The method's state for the checkpoint (tensors, numbers, containers of them)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output after a resume."""

    # ------------------------------------------------------------------ helpers for subclasses
    def dense_parameters(self, ctx: RunContext) -> dict[str, nn.Parameter]:
        """The non-expert parameters that train (config ``non_expert``), by name."""
        from flux.federation.workload import dense_trainable

        return dense_trainable(ctx.work.model, ctx.work.handle, ctx.cfg.non_expert)

    def train(self, ctx: RunContext, round_idx: int, pid: int, params, **kwargs):
        """The shared local loop (:func:`flux.federation.local.train_local`) with the run's
        steps, batch size, learning rates and participant's batch stream; ``kwargs`` are its
        hooks.  Returns its ``LocalStats``."""
        from flux.federation.local import round_lr, train_local
        from flux.federation.rng import Stream, participant_generator

        cfg = ctx.cfg
        lr = round_lr(cfg, round_idx)
        return train_local(ctx.work.model, ctx.work.train[pid], params, steps=cfg.local_steps,
                           batch_size=cfg.batch_size, lr=lr, dense_params=list(self.dense_parameters(ctx).values()),
                           dense_lr=lr * cfg.dense_lr_scale,
                           generator=participant_generator(cfg.seed, round_idx, pid, Stream.LOCAL_BATCHES), **kwargs)

    def session(self, ctx: RunContext, round_idx: int, pid: int):
        """A :class:`flux.methods.session.ParticipantSession` for participant ``pid``'s round."""
        from flux.methods.session import ParticipantSession

        return ParticipantSession(self, ctx, round_idx, pid)
