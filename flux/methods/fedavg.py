"""FedAvg: every participant trains every expert (and the dense trainables), no memory limit.

The accuracy reference of every comparison: the global experts are trained in place and put
back afterwards (one copy of them is the deltas' reference), so the participant leaves the
global model as it found it.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from flux.federation.update import Update
from flux.methods.api import Method, RunContext


class FedAvg(Method):
    """Every participant trains every expert; expert-wise FedAvg aggregation (the default)."""

    name = "fedavg"

    def expert_parameters_trainable(self, ctx: RunContext) -> list[nn.Parameter]:
        """The global experts' parameters (trained in place)."""
        return [p for layer in ctx.work.handle.moe_layers for p in layer.source.expert_parameters()]

    def peak_memory(self, ctx: RunContext, dense: dict) -> int:
        """Resident bytes of training the whole model with AdamW."""
        from flux.moe import estimate_memory

        return estimate_memory(ctx.work.handle, None, optimizer="adamw", train_experts=True,
                               trainable=list(dense.values())).total

    def local_update(self, ctx: RunContext, round_idx: int, pid: int, plan: Any, profile: Any) -> Update:
        from flux.methods.uploads import clone_weights, expert_delta, expert_tokens

        handle = ctx.work.handle
        with self.session(ctx, round_idx, pid) as s:
            experts = self.expert_parameters_trainable(ctx)
            s.begin(views=False, extra={f"__expert{i}": p for i, p in enumerate(experts)})
            # one copy of the global experts: the deltas' reference and what is restored afterwards
            before = {(l, e): clone_weights(layer.expert_weights(e)) for l, layer in enumerate(handle.moe_layers)
                      for e in range(layer.num_experts)}
            try:
                stats = s.train()
                tokens = expert_tokens(handle)
                deltas = {key: expert_delta(handle.moe_layers[key[0]].expert_weights(key[1]), w0)
                          for key, w0 in before.items() if key in tokens}
            finally:
                for (l, e), w0 in before.items():
                    handle.moe_layers[l].set_expert_weights(e, w0)
            return s.upload(stats, deltas, tokens, peak_memory_bytes=self.peak_memory(ctx, s.dense))
