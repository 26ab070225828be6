"""Adapters: how :func:`flux.patch` recognises and runs MoE blocks that are not transformers 5.x
experts modules (remote code whose experts are an ``nn.ModuleList`` of MLPs).

An adapter describes one block layout.  The built-in :class:`ModuleListAdapter` covers the
DeepSeek-MoE v1 / LLaMA-MoE style::

    block.experts        nn.ModuleList of MLPs with gate_proj / up_proj / down_proj (nn.Linear),
                         y_e = down(act(gate(x)) * up(x)) with act = SiLU or exact GELU: the
                         expert's act_fn / act attribute, or, when the activation is written
                         inline in forward, found by probing the expert (flux/moe/glu.py)
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

Adapters registered later are tried first; the built-in one is tried last.

A matched block the op cannot run is a warning, never an error: it keeps its original forward
(same outputs as unpatched; counts are still recorded through a hook on the gate; merged views
are not available).  That covers an activation that is not SiLU / exact GELU (tanh-GELU and ReLU
are named in the warning) or that no probe identifies, experts of different shapes, mixed
biases, non-float or mixed-dtype weights, projections whose class overrides ``nn.Linear.forward``
(quantized layers), and a gate whose output is not a top-k choice (:class:`GateOutputError`
found on the first forward, which then runs the block's own code).  Errors are kept for what the
user states explicitly: an object passed as an adapter that lacks the methods, or an
``activation()`` override returning a name that is no known activation.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

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


class GateOutputError(TypeError):
    """A block's gate returned something that is not a top-k choice (:func:`parse_gate_output`).

    ``output`` is what the gate returned; :mod:`flux.moe.modulelist` catches this on a patched
    block's forward and runs the block's own code instead (a warning, not a crash)."""

    def __init__(self, message: str, output: Any = None) -> None:
        super().__init__(message)
        self.output = output


def _is_index(t: Tensor) -> bool:
    # a bool dispatch mask (e.g. Hunyuan's [T, E, C]) is not a list of expert ids
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def parse_gate_output(out: Any, where: str = "gate") -> Routing:
    """Find (indices, weights, aux loss) in whatever a top-k gate returned.

    Raises:
        GateOutputError (a TypeError) when ``out`` holds no integer ids [..., k] with float
        weights of the same shape.
    """
    if isinstance(out, dict):
        tensors = {k: v for k, v in out.items() if isinstance(v, Tensor)}
        ids = next((tensors[k] for k in _IDS_KEYS if k in tensors and _is_index(tensors[k])), None)
        w = next((tensors[k] for k in _WEIGHT_KEYS if k in tensors and tensors[k].is_floating_point()), None)
        aux = next((tensors[k] for k in _AUX_KEYS if k in tensors), None)
        if ids is not None and w is not None and ids.shape == w.shape:
            return Routing(ids, w, aux, out)
    elif isinstance(out, (tuple, list)):
        tensors = [t for t in out if isinstance(t, Tensor)]
        ids = next((t for t in tensors if _is_index(t) and t.dim() >= 1), None)
        w = None
        if ids is not None:
            w = next((t for t in tensors if t.is_floating_point() and t.shape == ids.shape), None)
        if ids is not None and w is not None:
            rest = [t for t in tensors if t is not ids and t is not w and t.is_floating_point() and t.numel() == 1]
            return Routing(ids, w, rest[0] if rest else None, out)
    desc = type(out).__name__
    if isinstance(out, (tuple, list)):
        desc += "(" + ", ".join(f"{type(t).__name__}{tuple(t.shape) if isinstance(t, Tensor) else ''}" for t in out) + ")"
    raise GateOutputError(
        f"{where} returned {desc}; expected top-k indices and weights (a tuple with an integer tensor and a "
        "float tensor of the same shape, or a dict with topk_idx/topk_weight). Register an adapter "
        "(flux.moe.register_adapter) that implements route() for this block.",
        out,
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

    def activation(self, block: nn.Module, expert: nn.Module) -> Union[Callable[[Tensor], Tensor], str, None]:
        """The expert's activation: a callable (probed elementwise), a name (``"silu"``,
        ``"gelu"``, ``"gelu_tanh"``, ``"relu"``; taken as stated), or None when the activation is
        written inline in ``forward``: the whole expert is then probed against
        ``down(act(gate(x)) * up(x))`` (flux/moe/glu.py, :func:`probe_expert`)."""
        for attr in ("act_fn", "act"):
            act = getattr(expert, attr, None)
            if callable(act):
                return act
        return None

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
_ADAPTER_METHODS = ("match", "experts", "projections", "activation", "gate", "top_k", "route", "combine")


def check_adapter(adapter: Any) -> None:
    """TypeError unless ``adapter`` has every method :func:`flux.patch` calls (an explicit
    argument, so a wrong one is the caller's mistake, not a layer to skip)."""
    for method in _ADAPTER_METHODS:
        if not callable(getattr(adapter, method, None)):
            raise TypeError(f"adapter {adapter!r} lacks {method}(); subclass flux.moe.ModuleListAdapter")
    if not isinstance(getattr(adapter, "name", None), str):
        raise TypeError(f"adapter {adapter!r} has no name (a str attribute); subclass flux.moe.ModuleListAdapter")


def register_adapter(adapter, *, first: bool = True):
    """Register ``adapter`` (an instance, or a class to instantiate) for :func:`flux.patch`.

    Adapters registered later are tried first (``first=False`` appends after the other user
    adapters, still before the built-in one).  Returns the instance (usable as a decorator on a
    class)."""
    if isinstance(adapter, type):
        instance = adapter()
    else:
        instance = adapter
    check_adapter(instance)
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
