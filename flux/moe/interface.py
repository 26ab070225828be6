"""transformers 5.x experts modules: the ``flux`` ExpertsInterface backend.

transformers decorates every fused experts class with ``@use_experts_implementation`` (flags
``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``, ``has_post_expert_norm``);
its forward dispatches on ``config._experts_implementation`` through
``transformers.integrations.moe.ExpertsInterface``.  :func:`register_backend` adds ``"flux"``
there; the backend function reads the FLUX state the patch left on the module
(``module._flux_layer``, a :class:`flux.moe.handle.MoELayerHandle`).  Routers are not touched,
so transformers' router-logit hooks keep working.

Which variants run through ``flux.ops.merged_moe`` (decided per module at patch time):

* the GLU: ``module._apply_gate`` is *probed* (flux/moe/glu.py).  SiLU or exact-GELU of the gate
  half times the up half runs natively, with [gate; up] halves (``concat``) or interleaved
  ``[g0, u0, g1, u1, ...]`` rows (``interleaved``).
* ``is_transposed`` ([E, H, 2I] / [E, I, H]): native; the stacks are transposed into a contiguous
  copy per call (differentiable, gradients reach the original Parameters).
* interleaved rows: native; de-interleaved copy per call.
* ``has_bias``: native, exact (see flux/moe/compute.py: constant-one input feature for the
  gate/up bias, a routing-weighted extra term for the down bias).
* Not expressible -> *fallback*: the module runs the implementation that was selected before
  patching (``grouped_mm`` by default; ``eager`` = the class's own forward), with a one-time
  warning; counts and weight access still work, merged views do not.  This covers a custom
  ``_apply_gate`` (GPT-OSS: clamped SwiGLU with alpha and ``up + 1``; OpenAI privacy filter, ...),
  ``has_gate=False`` (up-projection only, e.g. Nemotron-H), ``has_post_expert_norm`` and
  expert parallelism.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from flux.moe.glu import probe_glu
from flux.moe.handle import LAYER_ATTR, ExpertSource
from flux.moe.merged_view import ExpertWeights
from flux.ops import QuantizedTensor

BACKEND_NAME = "flux"
_warned: set[type] = set()  # one warning per experts class


def _original_forward(module: nn.Module):
    fwd = type(module).forward
    return getattr(fwd, "__wrapped__", fwd)


def is_experts_module(module: nn.Module) -> bool:
    """A module built by a ``@use_experts_implementation`` class."""
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "is_transposed")
        and hasattr(module, "config")
        and hasattr(type(module).forward, "__wrapped__")
        and isinstance(getattr(module, "down_proj", None), Tensor)
        and (isinstance(getattr(module, "gate_up_proj", None), Tensor) or isinstance(getattr(module, "up_proj", None), Tensor))
    )


def flux_experts_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The function registered as ExpertsInterface ``"flux"``."""
    layer = module.__dict__.get(LAYER_ATTR)
    if layer is None:  # a module sharing the config but not patched: its own code
        return _original_forward(module)(module, hidden_states, top_k_index, top_k_weights)
    return layer.forward(hidden_states, top_k_index, top_k_weights)


def register_backend() -> None:
    """Register ``"flux"`` with transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(BACKEND_NAME, flux_experts_forward)


def _interface_fn(name: Optional[str], module: nn.Module):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if name in (None, "eager", BACKEND_NAME) or name not in ALL_EXPERTS_FUNCTIONS:
        return _original_forward(module)
    return ALL_EXPERTS_FUNCTIONS[name]


class _ModuleProxy:
    """The experts module with some attributes replaced (group weights of a merged view)."""

    def __init__(self, module: nn.Module, overrides: dict) -> None:
        self.__dict__["_module"] = module
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


class _CatOwnGrads(torch.autograd.Function):
    """torch.cat along dim 0 whose backward gives every input a gradient of its own storage
    (plain cat hands out views of one buffer, which optimizers would keep alive whole)."""

    @staticmethod
    def forward(ctx, *parts):
        ctx.sizes = [p.shape[0] for p in parts]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return tuple(g.clone() for g in grad.split(ctx.sizes))


def _cat_own_grads(parts):
    return parts[0] if len(parts) == 1 else _CatOwnGrads.apply(*parts)


class InterfaceSource(ExpertSource):
    """Weights of a transformers 5.x fused experts module (the original nn.Parameters)."""

    kind = "experts_interface"

    def __init__(self, module: nn.Module, previous_implementation: Optional[str]) -> None:
        super().__init__()
        self.module = module
        self.owner = module
        self.previous_implementation = previous_implementation
        self.has_bias = bool(getattr(module, "has_bias", False))
        self.is_transposed = bool(getattr(module, "is_transposed", False))
        name = type(module).__name__
        reason = None
        if not module.has_gate:
            reason = "has_gate=False (up projection only, no GLU)"
            up = module.up_proj
            self.num_experts = up.shape[0]
            inter = up.shape[2] if self.is_transposed else up.shape[1]
            self.hidden_size = up.shape[1] if self.is_transposed else up.shape[2]
            self.intermediate_size = inter
            self.layout = None
        else:
            gu = module.gate_up_proj
            self.num_experts = gu.shape[0]
            two_i, hidden = (gu.shape[2], gu.shape[1]) if self.is_transposed else (gu.shape[1], gu.shape[2])
            self.hidden_size = hidden
            self.intermediate_size = two_i // 2
            act, layout = probe_glu(module._apply_gate, self.intermediate_size, gu.device if gu.device.type != "meta" else "cpu")
            # a fallback module keeps its declared layout (for expert_weights and views)
            self.layout = layout or ("concat" if getattr(module, "is_concatenated", True) else "interleaved")
            if getattr(module, "has_post_expert_norm", False):
                reason = "has_post_expert_norm=True (a norm after each expert)"
            elif getattr(module, "_is_expert_parallel", False):
                reason = "expert parallelism"
            elif act is None:
                reason = (f"{name}._apply_gate is not act(gate) * up with act = SiLU or exact GELU "
                          "(e.g. clamped / offset SwiGLU, tanh-GELU)")
            self.activation = None if reason else act
        self.fallback_reason = reason
        if reason and type(module) not in _warned:
            _warned.add(type(module))
            warnings.warn(
                f"flux.patch: {name} runs its original experts implementation "
                f"({previous_implementation or 'eager'}), not flux.ops.merged_moe: {reason}. "
                "Counts and expert weights are available; merged views are not.",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ layout conversion
    def _deinterleave(self, t: Tensor, dim: int) -> Tensor:
        if self.layout != "interleaved":
            return t
        idx_gate = torch.arange(0, t.shape[dim], 2, device=t.device)
        idx_up = torch.arange(1, t.shape[dim], 2, device=t.device)
        return torch.cat((t.index_select(dim, idx_gate), t.index_select(dim, idx_up)), dim=dim)

    def full_stacks(self):
        m = self.module
        gu, dn = m.gate_up_proj, m.down_proj
        if self.is_transposed:
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        gu = self._deinterleave(gu, 1)
        b1 = b2 = None
        if self.has_bias:
            b1 = self._deinterleave(m.gate_up_proj_bias, 1)
            b2 = m.down_proj_bias
        return gu.contiguous(), dn.contiguous(), b1, b2

    def expert(self, index: int) -> ExpertWeights:
        m = self.module
        if not m.has_gate:
            up = m.up_proj[index]
            dn = m.down_proj[index]
            if self.is_transposed:
                up, dn = up.t(), dn.t()
            return ExpertWeights(up.detach(), dn.detach(),
                                 m.up_proj_bias[index].detach() if self.has_bias else None,
                                 m.down_proj_bias[index].detach() if self.has_bias else None)
        gu, dn = m.gate_up_proj[index], m.down_proj[index]
        if self.is_transposed:
            gu, dn = gu.t(), dn.t()
        gu = self._deinterleave(gu, 0)
        b1 = b2 = None
        if self.has_bias:
            b1 = self._deinterleave(m.gate_up_proj_bias[index], 0).detach()
            b2 = m.down_proj_bias[index].detach()
        return ExpertWeights(gu.detach(), dn.detach(), b1, b2)

    def _interleave(self, t: Tensor, dim: int) -> Tensor:
        if self.layout != "interleaved":
            return t
        half = t.shape[dim] // 2
        gate, up = t.narrow(dim, 0, half), t.narrow(dim, half, half)
        return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)

    @torch.no_grad()
    def write_expert(self, index: int, weights: ExpertWeights) -> None:
        m = self.module
        if not m.has_gate:
            raise NotImplementedError(f"{type(m).__name__}: writing experts without a gate projection")
        gu = self._interleave(weights.gate_up, 0)
        dn = weights.down
        if self.is_transposed:
            gu, dn = gu.t(), dn.t()
        m.gate_up_proj[index].copy_(gu)
        m.down_proj[index].copy_(dn)
        if self.has_bias:
            m.gate_up_proj_bias[index].copy_(self._interleave(weights.gate_up_bias, 0))
            m.down_proj_bias[index].copy_(weights.down_bias)

    def parameter_slots(self):
        m = self.module
        names = ["gate_up_proj" if m.has_gate else "up_proj", "down_proj"]
        if self.has_bias:
            names += ["gate_up_proj_bias" if m.has_gate else "up_proj_bias", "down_proj_bias"]
        return [(m, n) for n in names]

    def fallback(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        fn = _interface_fn(self.previous_implementation, self.module)
        return fn(self.module, x, topk_ids, topk_weights)

    @property
    def supports_view(self) -> bool:
        """Views run natively, or for a gated fallback module through its own implementation."""
        return self.activation is not None or (self.module.has_gate and not getattr(self.module, "_is_expert_parallel", False))

    def fallback_view(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, view) -> Tensor:
        """A merged view on a module the op cannot run: the groups become the experts of a
        stand-in module (native layout) that transformers' implementation runs; routed ids are
        mapped to groups, dropped experts get weight 0."""
        gu, dn, b1, b2 = view.stacks()
        dtype = view._dtype()
        gu = _cat_own_grads([s.dequantize(dtype) if isinstance(s, QuantizedTensor) else s for s in gu])
        dn = _cat_own_grads([s.dequantize(dtype) if isinstance(s, QuantizedTensor) else s for s in dn])
        gu = self._interleave(gu, 1)
        if self.is_transposed:
            gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
        overrides = dict(gate_up_proj=gu, down_proj=dn, num_experts=gu.shape[0])
        if b1 is not None:
            overrides["gate_up_proj_bias"] = self._interleave(_cat_own_grads(b1), 1)
            overrides["down_proj_bias"] = _cat_own_grads(b2)
        groups = view.group_of_expert.long()[topk_ids.long()]
        weights = topk_weights * (groups >= 0).to(topk_weights.dtype)
        fn = _interface_fn(self.previous_implementation, self.module)
        return fn(_ModuleProxy(self.module, overrides), x, groups.clamp(min=0), weights)

    def attach(self, layer) -> None:  # dispatch happens through the config's experts implementation
        pass

    def detach(self) -> None:
        pass
