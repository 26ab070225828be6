""":func:`patch` / :func:`unpatch`: swap a model's MoE layers onto ``flux.ops.merged_moe`` in place.

Detection walks ``model.named_modules()`` (depth order) and takes, for each module not inside
an already taken one:

1. a transformers 5.x experts module (``@use_experts_implementation`` class): the ``"flux"``
   ExpertsInterface backend is registered and selected for its config
   (``set_experts_implementation("flux")`` on the model, or the config attribute directly when
   the experts config is not reachable that way, e.g. inside a PEFT wrapper); routers untouched;
2. else the first registered adapter that matches (flux/moe/adapters.py), e.g. the built-in
   ModuleList adapter for DeepSeek-MoE v1 / LLaMA-MoE style blocks.

A found layer the op cannot run is a warning and a fallback to the model's own code, never an
error (the model computes what it computed before; counts are kept where the router's output
can be read).  Errors are for the caller's own mistakes: patching twice, a model without any MoE
layer, an ``adapters`` entry that is not an adapter.

Nothing in the state_dict changes, so optimizers built before patching keep their Parameters
and ``save_pretrained`` writes the original checkpoint format.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from torch import nn

from flux.moe.adapters import ModuleListAdapter, check_adapter, registered_adapters
from flux.moe.handle import MoELayerHandle, PatchHandle

HANDLE_ATTR = "_flux_patch_handle"
_ROUTER_NAMES = ("gate", "router")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "topk", "moe_topk", "num_experts_per_token")


def _parent(modules: dict, name: str) -> Optional[nn.Module]:
    if not name:
        return None
    return modules.get(name.rsplit(".", 1)[0] if "." in name else "")


def _router_and_top_k(parent: Optional[nn.Module], experts: nn.Module):
    router = None
    if parent is not None:
        for n in _ROUTER_NAMES:
            m = getattr(parent, n, None)
            if isinstance(m, nn.Module) and m is not experts:
                router = m
                break
    for owner in (router, parent, getattr(experts, "config", None)):
        if owner is None:
            continue
        for attr in _TOP_K_ATTRS:
            v = getattr(owner, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return router, v
    return router, None


def _wrapped_by_peft(modules: dict, name: str, module: nn.Module) -> bool:
    """PEFT's ParamWrapper (LoRA on expert parameters, ``target_parameters``) wraps the experts
    module and parametrizes its weights during the wrapper's forward."""
    parent = _parent(modules, name)
    return parent is not None and getattr(parent, "base_layer", None) is module and hasattr(parent, "parameter_name")


def _select_flux(model: nn.Module, experts_modules: list[nn.Module]) -> list:
    """Select the flux backend for every experts module; returns restore actions."""
    from flux.moe.interface import BACKEND_NAME

    configs = []
    for m in experts_modules:
        if not any(m.config is c for c in configs):
            configs.append(m.config)
    previous = [(c, c._experts_implementation) for c in configs]
    # the documented way first: every PreTrainedModel reachable from the root
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is how these modules exist at all
        PreTrainedModel = ()
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            try:
                m.set_experts_implementation(BACKEND_NAME)
            except Exception:  # e.g. a model type that refuses switching; set configs directly below
                pass
            break
    for c in configs:
        if c._experts_implementation != BACKEND_NAME:
            c._experts_implementation_internal = BACKEND_NAME

    def restore():
        for c, prev in previous:
            c._experts_implementation_internal = prev

    return [restore], previous


def patch(model: nn.Module, *, adapters: Optional[Sequence[ModuleListAdapter]] = None) -> PatchHandle:
    """Route every MoE layer of ``model`` through ``flux.ops.merged_moe``, in place.

    Args:
        model: a transformers model (any 5.x family whose experts use the experts interface), a
            PEFT wrapper of one, or any nn.Module containing blocks an adapter matches.
        adapters: adapters to try (default: :func:`flux.moe.registered_adapters`).

    Returns:
        A :class:`PatchHandle`; ``handle.moe_layers`` lists the layers in depth order.

    Layers that cannot run through the op (activation other than SiLU / exact GELU, experts of
    different shapes, quantized projections, a gate whose output is not a top-k choice, ...) keep
    the model's own code with a RuntimeWarning; ``layer.native`` is False and
    ``layer.fallback_reason`` says why.

    Raises:
        RuntimeError if the model is already patched; ValueError if no MoE layer is found;
        TypeError if an entry of ``adapters`` lacks an adapter method.
    """
    existing = model.__dict__.get(HANDLE_ATTR)
    if existing is not None and not existing.restored:
        raise RuntimeError("model is already patched by flux; call handle.restore() / flux.unpatch(model) first")
    if adapters is not None:
        adapters = list(adapters)
        for adapter in adapters:  # explicit: a wrong one is the caller's mistake, said up front
            check_adapter(adapter)
    else:
        adapters = registered_adapters()
    modules = dict(model.named_modules(remove_duplicate=True))

    from flux.moe.interface import is_experts_module

    found: list[tuple[str, nn.Module, object]] = []  # (name, module, adapter or None)
    taken: list[str] = []
    for name, module in modules.items():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        if is_experts_module(module):
            found.append((name, module, None))
            taken.append(name)
            continue
        for adapter in adapters:
            if adapter.match(module):
                found.append((name, module, adapter))
                taken.append(name)
                break
    if not found:
        raise ValueError(
            f"flux.patch: no MoE layer found in {type(model).__name__} (neither transformers experts modules nor a "
            "block matched by a registered adapter); see flux.moe.register_adapter"
        )

    restore_actions: list = []
    previous: list = []
    interface_modules = [m for _, m, a in found if a is None]
    if interface_modules:
        from flux.moe.interface import register_backend

        register_backend()
        actions, prev = _select_flux(model, interface_modules)
        restore_actions += actions
        previous = prev

    from flux.moe.interface import InterfaceSource
    from flux.moe.modulelist import ModuleListSource

    layers: list[MoELayerHandle] = []
    try:
        for name, module, adapter in found:
            if adapter is None:
                prev = next(p for c, p in previous if c is module.config)
                source = InterfaceSource(module, prev)
                router, top_k = _router_and_top_k(_parent(modules, name), module)
            else:
                source = ModuleListSource(module, adapter)
                router, top_k = adapter.gate(module), adapter.top_k(module)
            layers.append(MoELayerHandle(source, index=len(layers), name=name, top_k=top_k, router=router))
            layers[-1].peft_wrapped = _wrapped_by_peft(modules, name, module)
            m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
            layers[-1].layer_idx = int(m.group(1)) if m else None
    except Exception:
        for layer in layers:
            layer._restore(write_back=False)
        for action in reversed(restore_actions):
            action()
        raise
    handle = PatchHandle(model, layers, restore_actions)
    model.__dict__[HANDLE_ATTR] = handle
    return handle


def unpatch(model: nn.Module, *, write_back: bool = True) -> None:
    """Restore a model patched by :func:`patch` (same as ``handle.restore()``)."""
    handle = model.__dict__.get(HANDLE_ATTR)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by flux")
    handle.restore(write_back=write_back)


def get_handle(model: nn.Module) -> Optional[PatchHandle]:
    """The live :class:`PatchHandle` of a patched model, or None."""
    return model.__dict__.get(HANDLE_ATTR)
