""":func:`quantize_model`: a forward-only snapshot of a model whose large weights are stored packed.

The snapshot is a structural copy of the model (``copy.deepcopy`` with a memo that maps every
large Parameter to a ``meta`` placeholder, so no full-precision weight is ever duplicated) plus
the packed weights (:class:`flux.ops.QuantizedTensor`).  Each module whose weights are packed
gets a forward pre-hook that dequantizes them into real tensors just before it runs and a
forward hook that puts the meta placeholders back right after, so at most one module's weights
are dense at any time.

What is packed: every floating Parameter with at least 2 dims (experts' fused 3-D stacks are
quantized row-wise along their last dim, so a group never spans two experts; attention
projections; routers; other Linear weights; an untied output head).  What stays a small dense
copy: embeddings (a table lookup, not a matmul; quantizing them would perturb every token),
norms, biases, 1-D vectors, buffers, and any Parameter tied to an embedding.
"""
from __future__ import annotations

import copy
import threading
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from flux.moe.handle import LAYER_ATTR, VIEW_MODULE
from flux.ops import QuantizedTensor, quantize

Packed = Union[QuantizedTensor, Tensor]


def _packs(param: Tensor, owners: list[nn.Module]) -> bool:
    """Whether a Parameter is stored packed (see the module docstring)."""
    return param.is_floating_point() and param.dim() >= 2 and not any(isinstance(m, nn.Embedding) for m in owners)


def _check_source(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if VIEW_MODULE in module._modules:
            raise ValueError(
                f"quantize_model: {name or type(model).__name__} has a merged view installed; profile the "
                "global model (remove_view() first)"
            )
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(f"quantize_model: parameter {name} is a meta placeholder (released weights?)")


def _unit_of_slots(skeleton: nn.Module) -> dict[tuple[int, str], nn.Module]:
    """(id(module), attr) -> the module whose call uses that weight, where it is not its owner:
    a patched MoE layer reads its expert tensors inside the layer owner's forward (the experts'
    own submodules, e.g. the Linears of a ModuleList block, are never called)."""
    units: dict[tuple[int, str], nn.Module] = {}
    for module in skeleton.modules():
        layer = module.__dict__.get(LAYER_ATTR)
        if layer is None:
            continue
        for owner, attr in layer.source.parameter_slots():
            units[(id(owner), attr)] = layer.source.owner
    return units


class QuantizedModel:
    """A packed, forward-only snapshot of a model (build it with :func:`quantize_model`).

    Attributes:
        module: the skeleton (the model's structure; packed weights are ``meta`` between calls).
        bits: 4 or 8, or None for an exact (unquantized) snapshot.
        group_size: columns per quantization scale.
        packed: qualified parameter name -> QuantizedTensor (or an exact clone when bits is None).
        peak_dequantized: the most modules that held dense packed weights at once (instrumentation).
    """

    def __init__(self, model: nn.Module, bits: Optional[int], group_size: int) -> None:
        _check_source(model)
        self.bits = bits
        self.group_size = group_size
        owners: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), []).append(module)
        memo: dict[int, Any] = {}
        packed_by_id: dict[int, Packed] = {}
        for p in {id(p): p for p in model.parameters()}.values():
            if _packs(p, owners[id(p)]):
                w = p.detach()
                packed_by_id[id(p)] = quantize(w, bits, group_size) if bits is not None else w.clone()
                memo[id(p)] = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)
            else:
                memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
        with torch.no_grad():
            self.module = copy.deepcopy(model, memo)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

        # one unit per module that is called: its packed slots, materialised around its forward
        skeleton_modules = dict(self.module.named_modules(remove_duplicate=False))
        redirect = _unit_of_slots(self.module)
        self.packed: dict[str, Packed] = {}
        self._units: dict[int, tuple[nn.Module, list[tuple[nn.Module, str, Packed, nn.Parameter]]]] = {}
        done: set[tuple[int, str]] = set()
        for mname, module in model.named_modules(remove_duplicate=False):
            skel = skeleton_modules[mname]
            for attr, p in module._parameters.items():
                if p is None or id(p) not in packed_by_id or (id(skel), attr) in done:
                    continue
                done.add((id(skel), attr))
                self.packed.setdefault(f"{mname}.{attr}" if mname else attr, packed_by_id[id(p)])
                unit = redirect.get((id(skel), attr), skel)
                entry = (skel, attr, packed_by_id[id(p)], skel._parameters[attr])
                self._units.setdefault(id(unit), (unit, []))[1].append(entry)
        self._live = 0
        self.peak_dequantized = 0
        self._lock = threading.Lock()
        for unit, _ in self._units.values():
            unit.register_forward_pre_hook(self._materialise_hook)
            unit.register_forward_hook(self._release_hook, always_call=True)

    # ------------------------------------------------------------------ hooks
    def _materialise(self, unit: nn.Module) -> None:
        slots = self._units[id(unit)][1]
        if not slots[0][0]._parameters[slots[0][1]].is_meta:
            return  # re-entrant call of the same unit
        for module, attr, packed, _ in slots:
            dense = packed.dequantize() if isinstance(packed, QuantizedTensor) else packed
            module._parameters[attr] = nn.Parameter(dense, requires_grad=False)
        self._live += 1
        self.peak_dequantized = max(self.peak_dequantized, self._live)

    def _release(self, unit: nn.Module) -> None:
        slots = self._units[id(unit)][1]
        if slots[0][0]._parameters[slots[0][1]].is_meta:
            return
        for module, attr, _, placeholder in slots:
            module._parameters[attr] = placeholder
        layer = unit.__dict__.get(LAYER_ATTR)
        if layer is not None and getattr(layer.source, "_cache", None) is not None:
            layer.source._cache = None  # a ModuleList layer caches its stacked weights under no_grad
        self._live -= 1

    def _materialise_hook(self, unit: nn.Module, args) -> None:
        self._materialise(unit)

    def _release_hook(self, unit: nn.Module, args, output) -> None:
        self._release(unit)

    # ------------------------------------------------------------------ public
    def __call__(self, **batch: Any) -> Any:
        """Run the skeleton forward under ``torch.no_grad()``; keyword arguments go to the model."""
        with self._lock, torch.no_grad():
            try:
                return self.module(**batch)
            finally:
                for unit, _ in self._units.values():  # an exception skips no release
                    self._release(unit)

    def packed_weight(self, module: nn.Module, attr: str = "weight") -> Optional[Packed]:
        """The packed form of ``module.<attr>`` (``module`` a submodule of :attr:`module`), or None."""
        for _, slots in self._units.values():
            for owner, name, packed, _ in slots:
                if owner is module and name == attr:
                    return packed
        return None

    @property
    def device(self) -> torch.device:
        for packed in self.packed.values():
            return packed.device
        return next(iter(self.module.buffers()), torch.empty(0)).device

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot holds: packed weights, the small dense copies and the buffers."""
        seen: set[int] = set()
        total = 0
        for packed in self.packed.values():
            if id(packed) not in seen:
                seen.add(id(packed))
                dense = not isinstance(packed, QuantizedTensor)
                total += packed.numel() * packed.element_size() if dense else packed.nbytes
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            if not t.is_meta and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def __repr__(self) -> str:
        return (f"QuantizedModel({type(self.module).__name__}, bits={self.bits}, group_size={self.group_size}, "
                f"packed={len(self.packed)}, nbytes={self.nbytes})")


def quantize_model(model: nn.Module, bits: Optional[int] = 4, *, group_size: int = 64) -> QuantizedModel:
    """A forward-only snapshot of ``model`` with its weight matrices quantized by ``flux.ops.quantize``.

    Args:
        model: any nn.Module (a transformers MoE model, patched by ``flux.patch`` or not).  It is
            only read; it may keep training afterwards (the snapshot shares no storage with it).
        bits: 4 (default) or 8; None makes an exact snapshot (dense clones, same mechanism).
        group_size: consecutive input columns sharing one fp32 scale.

    Raises:
        ValueError for bad ``bits``/``group_size``, a model with a merged view installed or with
        released (meta) weights.
    """
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4, 8 or None, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return QuantizedModel(model, bits, group_size)
