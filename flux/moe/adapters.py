"""Adapters: how :func:`flux.patch` recognises and runs MoE blocks that are not transformers 5.x
experts modules (remote code whose experts are an ``nn.ModuleList`` of MLPs).

An adapter describes one block layout.  The built-in :class:`ModuleListAdapter` covers the
DeepSeek-MoE v1 / LLaMA-MoE style::

    block.experts        nn.ModuleList of MLPs with gate_proj / up_proj / down_proj (nn.Linear)
                         and act_fn (SiLU or exact GELU), y_e = down(act(gate(x)) * up(x))
    block.gate           a module returning the top-k choices: a tuple/list holding an integer
                         tensor (indices) and a float tensor of the same shape (weights), plus
                         optionally a scalar aux loss; or a dict with keys such as
                         topk_idx / topk_weight / aux_loss (also topK_indices / topK_scores /
                         balance_loss, selected_experts / routing_weights)
    block output         sum_j w_j * y_{e_j}  (+ shared_experts(x) or shared_expert(x), times
                         sigmoid(shared_expert_gate(x)) if present); in training the aux loss is
                         attached with the remote module's own ``AddAuxiliaryLoss`` when it
                         defines one (DeepSeek-MoE), otherwise kept on ``layer.last_aux_loss``.

Other layouts: subclass :class:`ModuleListAdapter`, override what differs, and register it::

    class MixtralV4Adapter(flux.moe.ModuleListAdapter):
        name = "mixtral_v4"
        projection_names = ("w1", "w3", "w2")          # gate, up, down
        def match(self, module):
            return type(module).__name__ == "MixtralSparseMoeBlock" and super().match(module)
        def gate_is_router(self, gate):               # nn.Linear logits are fine here ...
            return True
        def route(self, block, hidden_states, *args, **kwargs):   # ... because we route ourselves
            logits = block.gate(hidden_states.reshape(-1, hidden_states.shape[-1]))
            w, ids = torch.topk(logits.softmax(-1, dtype=torch.float), block.top_k, dim=-1)
            return Routing(ids, w / w.sum(-1, keepdim=True))

    flux.moe.register_adapter(MixtralV4Adapter())

Adapters registered later are tried first; the built-in one is tried last.  Blocks whose
activation the op cannot run keep their original forward (counts are still recorded through a
hook on the gate; merged views are not available).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

_IDS_KEYS = ("topk_idx", "topk_ids", "topK_indices", "top_k_index", "topk_indices", "selected_experts", "indices")
_WEIGHT_KEYS = ("topk_weight", "topk_weights", "topK_scores", "top_k_weights", "routing_weights", "scores", "weights")
_AUX_KEYS = ("aux_loss", "balance_loss", "load_balancing_loss")


@dataclass
class Routing:
    """The router's decision for a batch: ids [T, k] (or [..., k]), weights like ids, optional aux loss."""

    topk_ids: Tensor
    topk_weights: Tensor
    aux_loss: Optional[Tensor] = None
    raw: Any = None


def parse_gate_output(out: Any, where: str = "gate") -> Routing:
    """Find (indices, weights, aux loss) in whatever a top-k gate returned."""
    if isinstance(out, dict):
        ids = next((out[k] for k in _IDS_KEYS if isinstance(out.get(k), Tensor)), None)
        w = next((out[k] for k in _WEIGHT_KEYS if isinstance(out.get(k), Tensor)), None)
        aux = next((out[k] for k in _AUX_KEYS if isinstance(out.get(k), Tensor)), None)
        if ids is not None and w is not None:
            return Routing(ids, w, aux, out)
    elif isinstance(out, (tuple, list)):
        tensors = [t for t in out if isinstance(t, Tensor)]
        ids = next((t for t in tensors if not t.is_floating_point() and t.dim() >= 1), None)
        w = None
        if ids is not None:
            w = next((t for t in tensors if t.is_floating_point() and t.shape == ids.shape), None)
        if ids is not None and w is not None:
            rest = [t for t in tensors if t is not ids and t is not w and t.is_floating_point() and t.numel() == 1]
            return Routing(ids, w, rest[0] if rest else None, out)
    desc = type(out).__name__
    if isinstance(out, (tuple, list)):
        desc += "(" + ", ".join(f"{type(t).__name__}{tuple(t.shape) if isinstance(t, Tensor) else ''}" for t in out) + ")"
    raise TypeError(
        f"{where} returned {desc}; expected top-k indices and weights (a tuple with an integer tensor and a "
        "float tensor of the same shape, or a dict with topk_idx/topk_weight). Register an adapter "
        "(flux.moe.register_adapter) that implements route() for this block."
    )


class ModuleListAdapter:
    """Describes a MoE block whose experts are an nn.ModuleList of gated MLPs (see module docs).

    Override any method; ``match`` decides which modules the adapter takes.
    """

    name = "modulelist_glu"
    experts_attr = "experts"
    gate_attr = "gate"
    projection_names = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared_attrs = ("shared_experts", "shared_expert")
    shared_gate_attr = "shared_expert_gate"
    top_k_attrs = ("top_k", "num_experts_per_tok", "topk", "moe_topk")

    # ------------------------------------------------------------------ recognition
    def match(self, module: nn.Module) -> bool:
        experts = getattr(module, self.experts_attr, None)
        if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
            return False
        gate = getattr(module, self.gate_attr, None)
        if not isinstance(gate, nn.Module) or not self.gate_is_router(gate):
            return False
        for expert in experts:
            if not all(isinstance(getattr(expert, n, None), nn.Linear) for n in self.projection_names):
                return False
        return self.top_k(module) is not None

    def gate_is_router(self, gate: nn.Module) -> bool:
        """A plain nn.Linear gate returns logits, not top-k choices: not ours by default."""
        return not isinstance(gate, nn.Linear)

    # ------------------------------------------------------------------ structure
    def experts(self, block: nn.Module) -> Sequence[nn.Module]:
        return list(getattr(block, self.experts_attr))

    def projections(self, block: nn.Module, expert: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """(gate_proj, up_proj, down_proj) of one expert."""
        return tuple(getattr(expert, n) for n in self.projection_names)  # type: ignore[return-value]

    def activation(self, block: nn.Module, expert: nn.Module) -> Callable[[Tensor], Tensor]:
        act = getattr(expert, "act_fn", None)
        if act is None:
            act = getattr(expert, "act", None)
        if act is None:
            raise AttributeError(f"{type(expert).__name__} has no act_fn; override ModuleListAdapter.activation")
        return act

    def gate(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.gate_attr)

    def top_k(self, block: nn.Module) -> Optional[int]:
        for owner in (self.gate(block) if hasattr(block, self.gate_attr) else None, block, getattr(block, "config", None)):
            if owner is None:
                continue
            for attr in self.top_k_attrs:
                v = getattr(owner, attr, None)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
        return None

    # ------------------------------------------------------------------ computation
    def route(self, block: nn.Module, hidden_states: Tensor, *args, **kwargs) -> Routing:
        """Call the block's own gate (its hooks run) and read the top-k choice."""
        return parse_gate_output(self.gate(block)(hidden_states), f"{type(block).__name__}.{self.gate_attr}")

    def combine(self, block: nn.Module, hidden_states: Tensor, routed: Tensor, routing: Routing, layer=None):
        """Block output from the routed experts' output (shaped like hidden_states)."""
        y = routed
        for attr in self.shared_attrs:
            shared = getattr(block, attr, None)
            if isinstance(shared, nn.Module):
                s = shared(hidden_states)
                shared_gate = getattr(block, self.shared_gate_attr, None)
                if isinstance(shared_gate, nn.Module):
                    s = torch.sigmoid(shared_gate(hidden_states)) * s
                y = y + s
                break
        aux = routing.aux_loss
        if layer is not None:
            layer.last_aux_loss = aux
        if aux is not None and block.training and aux.requires_grad:
            add_aux = getattr(sys.modules.get(type(block).__module__), "AddAuxiliaryLoss", None)
            if add_aux is not None:
                y = add_aux.apply(y, aux)
        return y


_REGISTRY: list[ModuleListAdapter] = []
_BUILTIN = ModuleListAdapter()


def register_adapter(adapter, *, first: bool = True):
    """Register ``adapter`` (an instance, or a class to instantiate) for :func:`flux.patch`.

    Adapters registered later are tried first (``first=False`` appends after the other user
    adapters, still before the built-in one).  Returns the instance (usable as a decorator on a
    class)."""
    if isinstance(adapter, type):
        instance = adapter()
    else:
        instance = adapter
    for method in ("match", "experts", "projections", "activation", "top_k", "route", "combine"):
        if not callable(getattr(instance, method, None)):
            raise TypeError(f"adapter {instance!r} lacks {method}(); subclass flux.moe.ModuleListAdapter")
    unregister_adapter(instance.name)
    if first:
        _REGISTRY.insert(0, instance)
    else:
        _REGISTRY.append(instance)
    return adapter


def unregister_adapter(name_or_adapter) -> None:
    name = name_or_adapter if isinstance(name_or_adapter, str) else name_or_adapter.name
    _REGISTRY[:] = [a for a in _REGISTRY if a.name != name]


def registered_adapters() -> list[ModuleListAdapter]:
    """Adapters in the order :func:`flux.patch` tries them (built-in last)."""
    return [*_REGISTRY, _BUILTIN]
