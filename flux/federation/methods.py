"""Fine-tuning methods as the engine sees them.

A method answers four questions for the engine:

* ``setup``: what each participant can afford (budgets from its memory profile);
* ``plan``: the server's per-round decision for the sampled participants (deterministic: every
  rank computes it from the same inputs, so no broadcast is needed);
* ``local_update``: what a participant does with the global model and returns (an
  :class:`~flux.federation.aggregate.Update`, experts keyed by (layer, expert));
* ``observe``: server state after aggregation (e.g. FLUX's utilities).

The participant always starts from the global weights and leaves them untouched (views are
removed without write-back, dense parameters restored), so one model per rank serves any number
of participants.  ``fedavg`` and ``flux`` live here; the other baselines in ``flux.baselines``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import Tensor, nn

from flux.federation.aggregate import Update
from flux.federation.local import participant_generator, round_lr, snapshot, take_deltas, train_local
from flux.federation.workload import dense_trainable, set_requires_grad


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


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the global model a participant downloads each round."""
    return tensor_bytes(p for p in model.parameters() if p.device.type != "meta")


def expert_tokens(handle) -> dict[tuple[int, int], int]:
    """(layer, expert) -> tokens routed there since the last ``reset_counts`` (aggregation weights)."""
    out = {}
    for l, layer in enumerate(handle.moe_layers):
        for e, c in enumerate(layer.counts.tolist()):
            if c:
                out[(l, e)] = int(c)
    return out


def clone_weights(w):
    """A detached copy of an ``ExpertWeights`` (biases stay None when absent)."""
    return dataclasses.replace(w, **{f.name: getattr(w, f.name).detach().clone()
                                     for f in dataclasses.fields(w) if getattr(w, f.name) is not None})


def expert_delta(after, before) -> dict[str, Tensor]:
    """{"gate_up", "down" (, biases)} differences of two ``ExpertWeights``."""
    out = {"gate_up": (after.gate_up.detach() - before.gate_up.detach()),
           "down": (after.down.detach() - before.down.detach())}
    if after.gate_up_bias is not None:
        out["gate_up_bias"] = after.gate_up_bias.detach() - before.gate_up_bias.detach()
        out["down_bias"] = after.down_bias.detach() - before.down_bias.detach()
    return out


def view_expert_deltas(handle, tokens: dict[tuple[int, int], int], *, routed_only: bool,
                       extra: Optional[dict[int, dict]] = None) -> tuple[dict, dict]:
    """Deltas of the experts a participant trained under merged views, against the originals.

    Args:
        tokens: (layer, expert) -> tokens routed there this round (``expert_tokens``).
        routed_only: skip trained experts no token reached (their delta is zero anyway).
        extra: per layer, {expert: ExpertWeights} of experts trained outside the view's
            trainable stacks (FLUX's zeroth-order exploration experts).

    Returns:
        ``(deltas, weights)``: (layer, expert) -> {"gate_up", "down"} differences, and the
        aggregation weight (routed tokens) of each.
    """
    deltas, weights = {}, {}
    for l, layer in enumerate(handle.moe_layers):
        current = {**layer.tuned_weights(), **((extra or {}).get(l, {}))}
        for e, w in current.items():
            if routed_only and (l, e) not in tokens:
                continue
            deltas[(l, e)] = expert_delta(w, layer.source.expert(e))
            weights[(l, e)] = tokens.get((l, e), 0)
    return deltas, weights


def make_update(pid: int, stats, model: nn.Module, deltas: dict, tokens: dict, dense_deltas: dict, *,
                peak_memory_bytes: int, utilities: Optional[dict] = None, profile_s: float = 0.0,
                overhead_s: float = 0.0, offload_bytes: int = 0, **extra) -> Update:
    """The :class:`Update` a participant uploads, with the stats every method reports.

    Args:
        stats: the ``LocalStats`` of its local training.
        deltas: (layer, expert) -> {"gate_up" [2I, H], "down" [H, I]} weight differences.
        tokens: (layer, expert) -> tokens routed there (the aggregation weights).
        dense_deltas: name -> difference of each trained non-expert parameter.
        extra: method-specific stats (numbers), kept in ``Update.stats``.
    """
    bytes_up = tensor_bytes(t for d in deltas.values() for t in d.values()) + tensor_bytes(dense_deltas.values())
    return Update(
        participant=pid, expert_deltas=deltas, expert_tokens=tokens, dense_deltas=dense_deltas,
        num_samples=len(stats.samples), utilities=utilities or {},
        stats={"compute_s": stats.seconds, "loss": stats.losses[-1] if stats.losses else float("nan"),
               "bytes_up": bytes_up, "bytes_down": model_weight_bytes(model), "peak_memory_bytes": peak_memory_bytes,
               "profile_s": profile_s, "overhead_s": overhead_s, "offload_bytes": offload_bytes, **extra},
    )


class Method:
    """Base class: override what differs.  Subclasses set ``name``."""

    name = "base"
    needs_profiles = False

    def setup(self, ctx: RunContext) -> None:
        pass

    def plan(self, ctx: RunContext, round_idx: int, sampled: list[int], profiles: dict[int, Any]) -> dict[int, Any]:
        return {pid: None for pid in sampled}

    def local_update(self, ctx: RunContext, round_idx: int, pid: int, plan: Any, profile: Any) -> Update:
        raise NotImplementedError

    def observe(self, ctx: RunContext, round_idx: int, updates: list[Update]) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ shared helpers
    def _dense(self, ctx: RunContext) -> dict[str, nn.Parameter]:
        return dense_trainable(ctx.work.model, ctx.work.handle, ctx.cfg.non_expert)

    def _train(self, ctx: RunContext, round_idx: int, pid: int, params, **kwargs):
        cfg = ctx.cfg
        lr = round_lr(cfg, round_idx)
        return train_local(ctx.work.model, ctx.work.train[pid], params, steps=cfg.local_steps,
                           batch_size=cfg.batch_size, lr=lr, dense_params=list(self._dense(ctx).values()),
                           dense_lr=lr * cfg.dense_lr_scale, generator=participant_generator(cfg.seed, round_idx, pid),
                           **kwargs)


class FedAvgMethod(Method):
    """Every participant trains every expert (and the dense trainables); no memory limit.  The
    accuracy reference."""

    name = "fedavg"

    def expert_parameters_trainable(self, ctx: RunContext) -> list[nn.Parameter]:
        return [p for layer in ctx.work.handle.moe_layers for p in layer.source.expert_parameters()]

    def peak_memory(self, ctx: RunContext, dense: dict) -> int:
        from flux.moe import estimate_memory

        return estimate_memory(ctx.work.handle, None, optimizer="adamw", train_experts=True,
                               trainable=list(dense.values())).total

    def local_update(self, ctx: RunContext, round_idx: int, pid: int, plan: Any, profile: Any) -> Update:
        work = ctx.work
        handle = work.handle
        dense = self._dense(ctx)
        experts = self.expert_parameters_trainable(ctx)
        trainable = dict(dense)
        trainable.update({f"__expert{i}": p for i, p in enumerate(experts)})
        set_requires_grad(work.model, trainable)
        before_dense = snapshot(dense)
        # one copy of the global experts: the deltas' reference and what is restored afterwards
        before_experts = {(l, e): clone_weights(layer.expert_weights(e)) for l, layer in enumerate(handle.moe_layers)
                          for e in range(layer.num_experts)}
        handle.reset_counts()
        stats = self._train(ctx, round_idx, pid, list(trainable.values()))
        tokens = expert_tokens(handle)
        deltas = {}
        for (l, e), w0 in before_experts.items():
            layer = handle.moe_layers[l]
            if (l, e) in tokens:
                deltas[(l, e)] = expert_delta(layer.expert_weights(e), w0)
            layer.set_expert_weights(e, w0)
        dense_deltas = take_deltas(dense, before_dense)
        set_requires_grad(work.model, None)
        return make_update(pid, stats, work.model, deltas, tokens, dense_deltas,
                           peak_memory_bytes=self.peak_memory(ctx, dense))


def make_method(name: str) -> Method:
    """The method registered under ``name`` (``RunConfig.method``)."""
    from flux.federation.flux_method import FluxMethod

    from flux.baselines import BASELINES

    registry: dict[str, type] = {"fedavg": FedAvgMethod, "flux": FluxMethod, **BASELINES}
    if name not in registry:
        raise ValueError(f"unknown method {name!r}; known: {sorted(registry)}")
    return registry[name]()
