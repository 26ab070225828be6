"""MoE blocks whose experts are an ``nn.ModuleList`` of gated MLPs (remote code such as
DeepSeek-MoE v1 / LLaMA-MoE), described by an adapter (flux/moe/adapters.py).

Patching replaces the block's ``forward`` on the instance (``del block.forward`` restores it):
the adapter's ``route`` calls the block's own gate, the routed experts run as one
``flux.ops.merged_moe`` call, and the adapter's ``combine`` adds shared experts / aux loss.  The
expert MLPs stay where they are (state_dict keys, optimizers and restore are unaffected): in the
full layout their weights are stacked into [E, 2I, H] / [E, H, I] per call with
``torch.stack`` / ``torch.cat`` (differentiable, so gradients land in the original
``nn.Linear`` parameters); when no gradient is needed the stacks are cached until a weight
changes (tensor version counters).  Expert Linear biases are supported (flux/moe/compute.py).

A block whose activation the op cannot run keeps its forward; a forward hook on its gate
records the counts.
"""
from __future__ import annotations

import types
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from flux.moe.adapters import ModuleListAdapter, parse_gate_output
from flux.moe.glu import probe_activation
from flux.moe.handle import LAYER_ATTR, ExpertSource
from flux.moe.merged_view import ExpertWeights


def _block_forward(block: nn.Module, hidden_states: Tensor, *args, **kwargs):
    layer = block.__dict__[LAYER_ATTR]
    adapter = layer.source.adapter
    routing = adapter.route(block, hidden_states, *args, **kwargs)
    hidden = hidden_states.shape[-1]
    x = hidden_states.reshape(-1, hidden)
    y = layer.forward(x, routing.topk_ids.reshape(x.shape[0], -1), routing.topk_weights.reshape(x.shape[0], -1))
    return adapter.combine(block, hidden_states, y.view(hidden_states.shape), routing, layer)


class ModuleListSource(ExpertSource):
    kind = "modulelist"

    def __init__(self, block: nn.Module, adapter: ModuleListAdapter) -> None:
        super().__init__()
        self.block = block
        self.owner = block
        self.adapter = adapter
        self.kind = f"modulelist:{adapter.name}"
        experts = adapter.experts(block)
        self.experts = experts
        projs = [adapter.projections(block, e) for e in experts]
        g0, u0, d0 = projs[0]
        self.num_experts = len(experts)
        self.intermediate_size, self.hidden_size = g0.weight.shape
        self.has_bias = g0.bias is not None
        for e, (g, u, d) in enumerate(projs):
            shapes = (tuple(g.weight.shape), tuple(u.weight.shape), tuple(d.weight.shape))
            want = ((self.intermediate_size, self.hidden_size),) * 2 + ((self.hidden_size, self.intermediate_size),)
            if shapes != want:
                raise ValueError(
                    f"{type(block).__name__}: expert {e} has projection shapes {shapes}, expected {want} "
                    "(all experts of a block must have one shape)"
                )
            biases = (g.bias is not None, u.bias is not None, d.bias is not None)
            if biases != (self.has_bias,) * 3:
                raise ValueError(f"{type(block).__name__}: expert {e} mixes biased and unbiased projections {biases}")
        act = adapter.activation(block, experts[0])
        device = g0.weight.device if g0.weight.device.type != "meta" else "cpu"
        self.activation = probe_activation(act, device)
        self.fallback_reason = None
        if self.activation is None:
            self.fallback_reason = f"activation {type(act).__name__} is not SiLU or exact GELU"
            warnings.warn(
                f"flux.patch: {type(block).__name__} keeps its original forward ({self.fallback_reason}); "
                "counts are recorded, merged views are not available.",
                RuntimeWarning,
                stacklevel=3,
            )
        self.projs = projs
        self._cache: Optional[tuple] = None
        self._hook = None

    # ------------------------------------------------------------------ weights
    def _versions(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for trio in self.projs for lin in trio for p in lin.parameters())

    def full_stacks(self):
        need_grad = torch.is_grad_enabled() and any(
            p.requires_grad for trio in self.projs for lin in trio for p in lin.parameters()
        )
        if not need_grad and self._cache is not None and self._cache[0] == self._versions():
            return self._cache[1]
        gu = torch.stack([torch.cat((g.weight, u.weight), dim=0) for g, u, _ in self.projs])
        dn = torch.stack([d.weight for _, _, d in self.projs])
        b1 = b2 = None
        if self.has_bias:
            b1 = torch.stack([torch.cat((g.bias, u.bias)) for g, u, _ in self.projs])
            b2 = torch.stack([d.bias for _, _, d in self.projs])
        stacks = (gu, dn, b1, b2)
        if need_grad:
            self._cache = None
        else:
            self._cache = (self._versions(), stacks)
        return stacks

    def expert(self, index: int) -> ExpertWeights:
        g, u, d = self.projs[index]
        b1 = torch.cat((g.bias, u.bias)).detach() if self.has_bias else None
        return ExpertWeights(torch.cat((g.weight, u.weight)).detach(), d.weight.detach(), b1,
                             d.bias.detach() if self.has_bias else None)

    @torch.no_grad()
    def write_expert(self, index: int, weights: ExpertWeights) -> None:
        g, u, d = self.projs[index]
        i = self.intermediate_size
        g.weight.copy_(weights.gate_up[:i])
        u.weight.copy_(weights.gate_up[i:])
        d.weight.copy_(weights.down)
        if self.has_bias:
            g.bias.copy_(weights.gate_up_bias[:i])
            u.bias.copy_(weights.gate_up_bias[i:])
            d.bias.copy_(weights.down_bias)

    def parameter_slots(self):
        slots = []
        for trio in self.projs:
            for lin in trio:
                slots.append((lin, "weight"))
                if self.has_bias:
                    slots.append((lin, "bias"))
        return slots

    def release(self) -> None:
        super().release()
        self._cache = None

    # ------------------------------------------------------------------ hooking
    def attach(self, layer) -> None:
        if self.activation is not None:
            self.block.forward = types.MethodType(_block_forward, self.block)
        else:
            gate = self.adapter.gate(self.block)
            where = f"{type(self.block).__name__}.{self.adapter.gate_attr}"

            def count_hook(module, args, output):
                layer.count(parse_gate_output(output, where).topk_ids)

            self._hook = gate.register_forward_hook(count_hook)

    def detach(self) -> None:
        self.block.__dict__.pop("forward", None)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._cache = None
