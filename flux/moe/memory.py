"""Memory accounting for a patched model: resident weights, gradients, optimizer state.

:func:`estimate_memory` predicts the bytes for a *layout* (per MoE layer: which experts are
tuned, how many merged frozen groups, quantization, whether the original experts stay
resident), a weight dtype and an optimizer, without building anything.
:func:`measure_memory` sums the real tensors of a model (and optimizer).  After installing the
same layout and taking an optimizer step the two agree byte for byte (tests/moe/test_memory.py).

Conventions (what the real tensors hold):

* weights: every parameter and buffer of the model, each storage once; meta tensors (released
  originals) count 0.  Per patched layer FLUX adds ``flux_counts`` (int64 [E]); a view adds
  ``group_of_expert`` (int32 [E]), trainable stacks ``[Gt, 2I, H]`` + ``[Gt, H, I]`` (+ biases)
  and frozen stacks (dense in the weight dtype, int4/int8 ``qdata`` + fp32 ``scales`` as in
  flux/ops/contracts.md, or NF4: packed codes + fp32 absmax per block + the 16-entry fp32 code
  book, :func:`flux.quant_bnb.frozen_bytes`).
* gradients: one tensor like each trainable parameter that took part in the step: in the full
  layout the expert parameters, under a view the trainable stacks; plus the non-expert
  parameters the caller trains.
* optimizer: ``adam``/``adamw``: ``exp_avg`` + ``exp_avg_sq`` like the parameter plus a float32
  ``step`` scalar per parameter (``amsgrad`` adds ``max_exp_avg_sq``); ``adamw8bit``
  (bitsandbytes): :func:`flux.quant_bnb.adamw8bit_state_bytes` per parameter (uint8 moments and
  an fp32 absmax per 256, fp32 moments below 4096 elements; the step is a Python int) plus its
  two 8-bit code books once per optimizer when any parameter is that large
  (``details["optimizer_shared"]``); ``sgd``: nothing, or a momentum buffer with ``momentum > 0``.

Transient memory inside a step (activations, the dequantized frozen stack during a call, the
per-call stacks of ModuleList / transposed layers) is not resident state and is not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from flux import quant_bnb
from flux.moe.handle import COUNTS_BUFFER, VIEW_MODULE, PatchHandle
from flux.moe.merged_view import FROZEN_QUANTIZATIONS, NF4


@dataclass
class LayerLayout:
    """Layout of one MoE layer for :func:`estimate_memory`.

    tuned: number of tuning experts (or their indices); each is its own trainable group.
    merged_groups: number of frozen (merged) groups.
    quantize_bits: None, 4 or 8 (flux int-N) or 'nf4' (bitsandbytes) for the frozen groups.
    keep_originals: whether the original experts stay resident next to the view.
    """

    tuned: Union[int, Sequence[int]] = 0
    merged_groups: int = 0
    quantize_bits: Optional[int | str] = None
    quantize_group_size: int = 64
    keep_originals: bool = True

    @property
    def num_tuned(self) -> int:
        return self.tuned if isinstance(self.tuned, int) else len(list(self.tuned))


@dataclass
class MemoryReport:
    """Bytes of resident weights, gradients and optimizer state (``details`` breaks them down)."""

    weights: int
    grads: int
    optimizer: int
    details: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer

    def __str__(self) -> str:
        mib = 1 << 20
        return (f"weights {self.weights / mib:.2f} MiB, grads {self.grads / mib:.2f} MiB, "
                f"optimizer {self.optimizer / mib:.2f} MiB, total {self.total / mib:.2f} MiB")


# ----------------------------------------------------------------------------- measurement
def _storage_bytes(tensors: Iterable[Tensor]) -> int:
    seen: set = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _optimizer_tensors(optimizer) -> list[Tensor]:
    out = []
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                out.append(v)
    return out


def measure_memory(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> MemoryReport:
    """Bytes actually held by ``model``'s parameters and buffers, their ``.grad``s and the
    optimizer's state tensors (each storage counted once)."""
    params = list(model.parameters())
    weights = _storage_bytes([*params, *model.buffers()])
    grads = _storage_bytes([p.grad for p in params if p.grad is not None])
    opt = _storage_bytes(_optimizer_tensors(optimizer)) if optimizer is not None else 0
    return MemoryReport(weights, grads, opt)


# ----------------------------------------------------------------------------- estimation
def _elem(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _optimizer_name(optimizer: Union[str, Mapping]) -> str:
    if isinstance(optimizer, Mapping):
        return str(optimizer.get("name", "adamw")).lower()
    return optimizer.lower()


def _optimizer_bytes(optimizer: Union[str, Mapping], numel: int, elem: int) -> int:
    """State bytes one trainable parameter of ``numel`` elements gets."""
    name = _optimizer_name(optimizer)
    if name == "adamw8bit":
        return quant_bnb.adamw8bit_state_bytes(numel)
    if isinstance(optimizer, Mapping):
        amsgrad = bool(optimizer.get("amsgrad", False))
        momentum = float(optimizer.get("momentum", 0.0))
    else:
        amsgrad, momentum = False, 0.0
        if name == "adamw_amsgrad" or name == "adam_amsgrad":
            name, amsgrad = name.split("_")[0], True
        if name == "sgd_momentum":
            name, momentum = "sgd", 0.9
    if name in ("adam", "adamw"):
        return (3 if amsgrad else 2) * numel * elem + 4  # exp_avg, exp_avg_sq (, max), fp32 step scalar
    if name == "sgd":
        return numel * elem if momentum > 0 else 0
    raise ValueError(f"optimizer {optimizer!r}: expected 'adam', 'adamw', 'adamw8bit', 'sgd', 'sgd_momentum' or a "
                     "dict {'name', 'amsgrad', 'momentum'}")


def _optimizer_shared_bytes(optimizer: Union[str, Mapping], max_numel: int) -> int:
    """State bytes one optimizer holds once, whatever its parameters: AdamW8bit's code books,
    created for its first parameter with 8-bit moments (``max_numel``: the largest trained one)."""
    if _optimizer_name(optimizer) == "adamw8bit" and max_numel >= quant_bnb.ADAMW8BIT_MIN_SIZE:
        return quant_bnb.ADAMW8BIT_SHARED_BYTES
    return 0


def _quantized_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    qdata = rows * (cols if bits == 8 else (cols + 1) // 2)
    return qdata + rows * math.ceil(cols / group_size) * 4


def _resolve_layouts(handle: PatchHandle, layout) -> list[Optional[LayerLayout]]:
    n = len(handle.moe_layers)
    if layout is None or isinstance(layout, LayerLayout):
        return [layout] * n
    if isinstance(layout, Mapping):
        bad = [k for k in layout if not isinstance(k, int) or not 0 <= k < n]
        if bad:
            raise ValueError(f"layout keys {bad} are not MoE layer indices in [0, {n})")
        return [layout.get(i) for i in range(n)]
    layouts = list(layout)
    if len(layouts) != n:
        raise ValueError(f"layout has {len(layouts)} entries but the model has {n} MoE layers")
    return layouts


def estimate_memory(
    handle: PatchHandle,
    layout: Union[None, LayerLayout, Sequence[Optional[LayerLayout]], Mapping[int, Optional[LayerLayout]]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    optimizer: Union[str, Mapping] = "adamw",
    train_experts: bool = True,
    trainable: Union[str, Iterable[nn.Parameter]] = "none",
) -> MemoryReport:
    """Predict resident bytes for a patched model under ``layout``.

    Args:
        handle: from :func:`flux.patch`.
        layout: per MoE layer a :class:`LayerLayout` (merged view) or None (full expert set);
            one LayerLayout for every layer, a list, or a {layer index: layout} dict.
        dtype: weight dtype (floating tensors; default: each tensor's current dtype).
        optimizer: 'adamw' | 'adam' | 'adamw8bit' | 'sgd' | 'sgd_momentum' (or a dict, see module
            docs).
        train_experts: full-layout layers train all their experts (else they are frozen).
        trainable: non-expert parameters that are trained: 'none', 'all', or the parameters
            (e.g. LoRA weights).

    The estimate ignores any view currently installed: it describes ``layout``.
    """
    layouts = _resolve_layouts(handle, layout)
    model = handle.model
    layers = handle.moe_layers

    def size_of(t: Tensor) -> int:
        return _elem(dtype) if (dtype is not None and t.is_floating_point()) else t.element_size()

    expert_ids: set[int] = set()
    view_ids: set[int] = set()
    counts_ids: set[int] = set()
    for layer in layers:
        for p in layer.source.expert_parameters():
            expert_ids.add(id(p))
        for _, _, original in layer.source._released:
            expert_ids.add(id(original))
        view = layer.source.owner._modules.get(VIEW_MODULE)
        if view is not None:
            view_ids.update(id(t) for t in (*view.parameters(), *view.buffers()))
        counts_ids.add(id(layer.source.owner._buffers[COUNTS_BUFFER]))
    if trainable == "all":
        train_ids = None
    elif trainable == "none":
        train_ids = set()
    else:
        train_ids = {id(p) for p in trainable}

    details = {"non_expert_weights": 0, "counts": 0, "expert_weights": 0, "view_trainable": 0, "view_frozen": 0,
               "view_index": 0, "non_expert_grads": 0, "expert_grads": 0, "non_expert_optimizer": 0,
               "expert_optimizer": 0, "optimizer_shared": 0}
    max_trained = 0  # the largest trained parameter's numel (AdamW8bit's shared code books)
    seen_storage: set = set()
    named = [*model.named_parameters(), *model.named_buffers()]
    params_ids = {id(p) for p in model.parameters()}
    for _, t in named:
        if id(t) in expert_ids or id(t) in view_ids:
            continue
        if t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen_storage and t.untyped_storage().nbytes():
            continue
        seen_storage.add(key)
        nbytes = t.numel() * size_of(t)
        if id(t) in counts_ids:
            details["counts"] += nbytes
            continue
        details["non_expert_weights"] += nbytes
        if id(t) in params_ids and (train_ids is None or id(t) in train_ids):
            details["non_expert_grads"] += nbytes
            details["non_expert_optimizer"] += _optimizer_bytes(optimizer, t.numel(), size_of(t))
            max_trained = max(max_trained, t.numel())

    per_layer = []
    for layer, lay in zip(layers, layouts):
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        bias = layer.source.has_bias
        el = _elem(dtype or layer.source.dtype)
        per_expert = 2 * i * h + h * i + ((2 * i + h) if bias else 0)
        row = {"layer": layer.index, "weights": 0, "grads": 0, "optimizer": 0}
        if lay is None:
            w = e * per_expert * el
            row["weights"] = w
            if train_experts:
                row["grads"] = w
                # per original parameter: fused stacks (interface) or one tensor per projection (ModuleList)
                numels = [p.numel() for p in layer.source.expert_parameters()]
                row["optimizer"] = sum(_optimizer_bytes(optimizer, n, el) for n in numels)
                max_trained = max([max_trained, *numels])
            details["expert_weights"] += w
        else:
            gt, gf = lay.num_tuned, lay.merged_groups
            if gt < 0 or gf < 0 or gt + gf > e:
                raise ValueError(f"layer {layer.index}: {gt} tuned + {gf} merged groups do not fit {e} experts")
            if lay.quantize_bits not in FROZEN_QUANTIZATIONS:
                raise ValueError(f"layer {layer.index}: quantize_bits must be None, 4, 8 or 'nf4', "
                                 f"got {lay.quantize_bits!r}")
            orig = e * per_expert * el if lay.keep_originals else 0
            tuned = gt * per_expert * el
            if gf == 0:
                frozen = 0
            elif lay.quantize_bits == NF4:  # one BnbQuantized per stack, blocks over the flattened stack
                frozen = (quant_bnb.frozen_bytes(gf * 2 * i * h, lay.quantize_group_size)
                          + quant_bnb.frozen_bytes(gf * h * i, lay.quantize_group_size)
                          + (gf * (2 * i + h) * el if bias else 0))
            elif lay.quantize_bits:
                frozen = (_quantized_bytes(gf * 2 * i, h, lay.quantize_bits, lay.quantize_group_size)
                          + _quantized_bytes(gf * h, i, lay.quantize_bits, lay.quantize_group_size)
                          + (gf * (2 * i + h) * el if bias else 0))
            else:
                frozen = gf * per_expert * el
            index_bytes = e * 4
            row["weights"] = orig + tuned + frozen + index_bytes
            details["expert_weights"] += orig
            details["view_trainable"] += tuned
            details["view_frozen"] += frozen
            details["view_index"] += index_bytes
            if gt:
                row["grads"] = tuned
                numels = [gt * 2 * i * h, gt * h * i] + ([gt * 2 * i, gt * h] if bias else [])
                row["optimizer"] = sum(_optimizer_bytes(optimizer, n, el) for n in numels)
                max_trained = max([max_trained, *numels])
        details["expert_grads"] += row["grads"]
        details["expert_optimizer"] += row["optimizer"]
        per_layer.append(row)
    details["per_layer"] = per_layer
    weights = (details["non_expert_weights"] + details["counts"] + details["expert_weights"] + details["view_trainable"]
               + details["view_frozen"] + details["view_index"])
    grads = details["non_expert_grads"] + details["expert_grads"]
    details["optimizer_shared"] = _optimizer_shared_bytes(optimizer, max_trained)
    opt = details["non_expert_optimizer"] + details["expert_optimizer"] + details["optimizer_shared"]
    return MemoryReport(weights, grads, opt, details)
