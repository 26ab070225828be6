"""Drop-in MoE layer: run Hugging Face MoE models through ``flux.ops.merged_moe``.

    handle = flux.patch(model)            # in place; same outputs and gradients as before
    layer = handle.moe_layers[0]          # depth order
    layer.num_experts, layer.top_k, layer.counts, layer.expert_weights(3)
    layer.install_merged_view(tuning=[0, 5], clusters=[[1, 2], [3, 4, 6, 7]])
    ...train handle.trainable_parameters()...
    layer.tuned_weights()                 # {0: ExpertWeights, 5: ExpertWeights}
    layer.remove_view()                   # writes the tuning experts back
    handle.restore()                      # or flux.unpatch(model)

Modules: interface.py (transformers ExpertsInterface backend), modulelist.py + adapters.py
(ModuleList blocks, adapter registry), handle.py (handles), merged_view.py (merged-expert
view), compute.py (the op call, biases), glu.py (activation probing), memory.py (accounting).
"""
from flux.moe.adapters import (GateOutputError, ModuleListAdapter, Routing, register_adapter, registered_adapters,
                               unregister_adapter)
from flux.moe.memory_budget import MemoryBudget, budgets_from_memory, fit_check, full_training_bytes, weights_bytes
from flux.moe.handle import MoELayerHandle, PatchHandle
from flux.moe.memory import LayerLayout, MemoryReport, estimate_memory, measure_memory
from flux.moe.merged_view import ExpertWeights, LayoutError, LayoutIndexError, MergedView
from flux.moe.patch import get_handle, patch, unpatch

__all__ = [
    "ExpertWeights",
    "GateOutputError",
    "LayerLayout",
    "LayoutError",
    "LayoutIndexError",
    "MemoryBudget",
    "MemoryReport",
    "MergedView",
    "ModuleListAdapter",
    "MoELayerHandle",
    "PatchHandle",
    "Routing",
    "budgets_from_memory",
    "estimate_memory",
    "fit_check",
    "full_training_bytes",
    "get_handle",
    "measure_memory",
    "patch",
    "register_adapter",
    "registered_adapters",
    "unpatch",
    "unregister_adapter",
    "weights_bytes",
]
