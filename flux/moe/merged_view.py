"""Merged-expert view of one MoE layer: E original experts served by G groups.

A view is ``expert_to_group`` (int [E], values in [-1, G); -1 drops the expert), group weights
in the transformers 5.x layout (gate_up [G, 2I, H], down [G, H, I], optional biases [G, 2I] /
[G, H]) and one trainable flag per group.  In FLUX a *tuning* expert is its own trainable group
and the non-tuning experts of a cluster share one frozen group (their weighted average).

Storage: the trainable groups form one ``nn.Parameter`` stack (``tuned_gate_up``,
``tuned_down``), the frozen groups one buffer stack (``frozen_*``), optionally int4/int8
(:class:`flux.ops.QuantizedTensor`, stored as its ``qdata``/``scales`` buffers) or bitsandbytes
NF4 (``quantize_bits="nf4"``: :class:`flux.quant_bnb.BnbQuantized`, stored as its packed codes,
absmax and code book buffers; dequantized to dense stacks for each call).  Both stacks go
to ``flux.ops.merged_moe`` as a list, trainable first, so frozen groups get no weight-gradient
work.  The router is untouched: it still scores the E original experts and ``expert_to_group``
maps its choices onto groups.

The view is an ``nn.Module`` registered as ``flux_view`` on the layer's owner module, so
``model.parameters()`` includes the trainable stacks and ``model.to()`` moves everything; its
tensors are left out of the parent's ``state_dict`` (a checkpoint keeps the original format).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

import flux.ops
from flux import quant_bnb
from flux.ops import QuantizedTensor

NF4 = "nf4"  # quantize_bits value for bitsandbytes NF4 frozen groups (block = quantize_group_size)
# what a view's frozen groups may be stored as: dense (None), flux int4 / int8, bitsandbytes NF4
FROZEN_QUANTIZATIONS = (None, 4, 8, NF4)
# config name (flux.frozen_format) -> quantize_bits; flux.federation.config.FROZEN_FORMATS lists the names
FROZEN_FORMATS = {"full": None, "int4": 4, "int8": 8, "nf4": NF4}


class LayoutError(ValueError):
    """A merged-view layout that does not fit the layer (the message names the bad value)."""


class LayoutIndexError(LayoutError, IndexError):
    """An expert or group index out of range."""


@dataclass
class ExpertWeights:
    """One expert's (or group's) weights in the transformers 5.x layout.

    gate_up [2I, H] (rows [0, I) gate, [I, 2I) up), down [H, I]; biases [2I] / [H] or None.
    """

    gate_up: Tensor
    down: Tensor
    gate_up_bias: Optional[Tensor] = None
    down_bias: Optional[Tensor] = None


def _as_index_list(values, name: str, layer: str) -> list[int]:
    if isinstance(values, Tensor):
        if values.dim() != 1:
            raise LayoutError(f"{layer}: {name} must be 1-D, got shape {tuple(values.shape)}")
        if values.is_floating_point() or values.is_complex():
            raise LayoutError(f"{layer}: {name} must hold integers, got dtype {values.dtype}")
        return [int(v) for v in values.tolist()]
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or int(v) != v:
            raise LayoutError(f"{layer}: {name}[{i}] = {v!r} is not an integer")
        out.append(int(v))
    return out


def validate_layout(
    *,
    layer: str,
    num_experts: int,
    hidden: int,
    intermediate: int,
    has_bias: bool,
    expert_to_group,
    gate_up: Tensor,
    down: Tensor,
    trainable: Sequence[bool],
    gate_up_bias: Optional[Tensor] = None,
    down_bias: Optional[Tensor] = None,
) -> tuple[list[int], list[bool]]:
    """Check a layout against a layer; returns (expert_to_group as ints, trainable as bools)."""
    e2g = _as_index_list(expert_to_group, "expert_to_group", layer)
    if len(e2g) != num_experts:
        raise LayoutError(
            f"{layer}: expert_to_group has {len(e2g)} entries but the layer has {num_experts} experts "
            "(one entry per original expert: its group, or -1 to drop it)"
        )
    for name, t in (("gate_up", gate_up), ("down", down)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise LayoutError(f"{layer}: {name} must be a floating tensor, got {type(t).__name__}"
                              + (f" of dtype {t.dtype}" if isinstance(t, Tensor) else ""))
        if t.dim() != 3:
            raise LayoutError(f"{layer}: {name} must be a 3-D stack [G, ...], got shape {tuple(t.shape)}")
    groups = gate_up.shape[0]
    if tuple(gate_up.shape) != (groups, 2 * intermediate, hidden):
        raise LayoutError(
            f"{layer}: gate_up has shape {tuple(gate_up.shape)}, expected {(groups, 2 * intermediate, hidden)} "
            f"= [G, 2I, H] with H={hidden}, I={intermediate}"
        )
    if tuple(down.shape) != (groups, hidden, intermediate):
        raise LayoutError(
            f"{layer}: down has shape {tuple(down.shape)}, expected {(groups, hidden, intermediate)} "
            f"= [G, H, I] with G={groups} (from gate_up), H={hidden}, I={intermediate}"
        )
    flags = trainable.tolist() if isinstance(trainable, Tensor) else list(trainable)
    if len(flags) != groups:
        raise LayoutError(f"{layer}: trainable has {len(flags)} flags but there are {groups} groups (gate_up.shape[0])")
    for i, f in enumerate(flags):
        if not isinstance(f, (bool, int)) or isinstance(f, int) and f not in (0, 1):
            raise LayoutError(f"{layer}: trainable[{i}] = {f!r} is not a bool")
    for e, g in enumerate(e2g):
        if g < -1 or g >= groups:
            raise LayoutIndexError(
                f"{layer}: expert_to_group[{e}] = {g} is out of range [-1, {groups}) (G = {groups} groups)"
            )
    used = set(g for g in e2g if g >= 0)
    unused = [g for g in range(groups) if g not in used]
    if unused:
        raise LayoutError(
            f"{layer}: {groups} groups given but group(s) {unused} serve no expert; "
            f"the group count must equal the number of distinct groups in expert_to_group ({len(used)})"
        )
    if has_bias:
        if gate_up_bias is None or down_bias is None:
            raise LayoutError(f"{layer}: the experts have biases; pass gate_up_bias [G, 2I] and down_bias [G, H]")
        if tuple(gate_up_bias.shape) != (groups, 2 * intermediate):
            raise LayoutError(f"{layer}: gate_up_bias has shape {tuple(gate_up_bias.shape)}, expected {(groups, 2 * intermediate)}")
        if tuple(down_bias.shape) != (groups, hidden):
            raise LayoutError(f"{layer}: down_bias has shape {tuple(down_bias.shape)}, expected {(groups, hidden)}")
    elif gate_up_bias is not None or down_bias is not None:
        raise LayoutError(f"{layer}: the experts have no biases but group biases were given")
    return e2g, [bool(f) for f in flags]


class MergedView(nn.Module):
    """Groups serving one layer (see the module docstring).  Build it with
    :meth:`flux.moe.MoELayerHandle.install_view`, not directly."""

    def __init__(
        self,
        *,
        expert_to_group: list[int],
        trainable: list[bool],
        gate_up: Tensor,
        down: Tensor,
        gate_up_bias: Optional[Tensor],
        down_bias: Optional[Tensor],
        dtype: torch.dtype,
        device: torch.device,
        quantize_bits: Optional[int | str] = None,
        quantize_group_size: int = 64,
    ) -> None:
        super().__init__()
        self.num_experts = len(expert_to_group)
        self.num_groups = gate_up.shape[0]
        self.trainable = list(trainable)
        self.expert_to_group = list(expert_to_group)  # caller's group numbering
        tuned = [g for g in range(self.num_groups) if trainable[g]]
        frozen = [g for g in range(self.num_groups) if not trainable[g]]
        # internal numbering: trainable groups first (stack 0), then frozen ones (stack 1)
        self._internal = {g: i for i, g in enumerate(tuned + frozen)}
        self._tuned_groups = tuned
        self._frozen_groups = frozen
        self.quantize_bits = quantize_bits
        self.quantize_group_size = quantize_group_size
        self.has_bias = gate_up_bias is not None
        internal = [self._internal[g] if g >= 0 else -1 for g in expert_to_group]
        self.register_buffer("group_of_expert", torch.tensor(internal, dtype=torch.int32, device=device), persistent=False)

        def take(t: Optional[Tensor], idx: list[int]) -> Optional[Tensor]:
            if t is None:
                return None
            return t.detach()[idx].to(device=device, dtype=dtype).contiguous()

        self.tuned_gate_up = nn.Parameter(take(gate_up, tuned)) if tuned else None
        self.tuned_down = nn.Parameter(take(down, tuned)) if tuned else None
        self.tuned_gate_up_bias = nn.Parameter(take(gate_up_bias, tuned)) if tuned and self.has_bias else None
        self.tuned_down_bias = nn.Parameter(take(down_bias, tuned)) if tuned and self.has_bias else None
        self._frozen_shapes = None
        if frozen:
            fgu, fdn = take(gate_up, frozen), take(down, frozen)
            if quantize_bits == NF4:
                quant_bnb.require("quantize_bits='nf4' (flux.frozen_format = 'nf4')")
                for name, w in (("gate_up", fgu), ("down", fdn)):
                    q = quant_bnb.quantize_frozen(w, NF4, quantize_group_size)
                    # the code book is a buffer too: it is resident state (memory.py counts it)
                    self.register_buffer(f"frozen_{name}_nf4", q.packed, persistent=False)
                    self.register_buffer(f"frozen_{name}_absmax", q.state.absmax, persistent=False)
                    self.register_buffer(f"frozen_{name}_code", q.state.code, persistent=False)
                self._frozen_shapes = (fgu.shape, fdn.shape)
            elif quantize_bits:
                qgu = flux.ops.quantize(fgu, bits=quantize_bits, group_size=quantize_group_size)
                qdn = flux.ops.quantize(fdn, bits=quantize_bits, group_size=quantize_group_size)
                self._frozen_shapes = (qgu.shape, qdn.shape)
                self.register_buffer("frozen_gate_up_qdata", qgu.qdata, persistent=False)
                self.register_buffer("frozen_gate_up_scales", qgu.scales, persistent=False)
                self.register_buffer("frozen_down_qdata", qdn.qdata, persistent=False)
                self.register_buffer("frozen_down_scales", qdn.scales, persistent=False)
            else:
                self.register_buffer("frozen_gate_up", fgu, persistent=False)
                self.register_buffer("frozen_down", fdn, persistent=False)
            if self.has_bias:
                self.register_buffer("frozen_gate_up_bias", take(gate_up_bias, frozen), persistent=False)
                self.register_buffer("frozen_down_bias", take(down_bias, frozen), persistent=False)
        # 0-element marker: follows model.to(dtype), so quantized frozen groups dequantize to
        # the dtype the rest of the model runs in
        self.register_buffer("dtype_marker", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.register_state_dict_post_hook(_strip_from_parent_state_dict)
        self.register_load_state_dict_pre_hook(_fill_from_self)

    # ------------------------------------------------------------------ structure
    @property
    def num_tuned(self) -> int:
        return len(self._tuned_groups)

    @property
    def num_frozen(self) -> int:
        return len(self._frozen_groups)

    @property
    def dropped_experts(self) -> list[int]:
        return [e for e, g in enumerate(self.expert_to_group) if g < 0]

    @property
    def tuned_experts(self) -> list[int]:
        """Original indices of the experts served by a trainable group."""
        return [e for e, g in enumerate(self.expert_to_group) if g >= 0 and self.trainable[g]]

    def experts_of_group(self, group: int) -> list[int]:
        return [e for e, g in enumerate(self.expert_to_group) if g == group]

    # ------------------------------------------------------------------ tensors
    def _dtype(self) -> torch.dtype:
        if self.tuned_gate_up is not None:
            return self.tuned_gate_up.dtype
        return self.dtype_marker.dtype

    def _nf4(self, name: str, shape: torch.Size, dtype: torch.dtype) -> quant_bnb.BnbQuantized:
        """The NF4 frozen stack ``name`` ('gate_up' / 'down') rebuilt from its buffers (they follow
        ``model.to(device)``), dequantizing to ``dtype``."""
        # model.to(dtype) casts the float buffers too; bitsandbytes reads fp32 absmax and code book
        return quant_bnb.BnbQuantized.from_buffers(
            getattr(self, f"frozen_{name}_nf4"), getattr(self, f"frozen_{name}_absmax").float(), NF4,
            self.quantize_group_size, shape, dtype, code=getattr(self, f"frozen_{name}_code").float())

    def _frozen_stacks(self, dtype: torch.dtype):
        """(gate_up [Gf, 2I, H], down [Gf, H, I]) of the frozen groups: dense ``dtype`` tensors or
        int-N :class:`QuantizedTensor` s (dequantized inside ``flux.ops``).  NF4 comes back dense:
        the op takes no bitsandbytes codes, and it would dequantize a QuantizedTensor stack for
        the call anyway, so the transient memory is the same."""
        if self.quantize_bits == NF4:
            gu_shape, dn_shape = self._frozen_shapes
            return (self._nf4("gate_up", gu_shape, dtype).dequantize(dtype),
                    self._nf4("down", dn_shape, dtype).dequantize(dtype))
        if self.quantize_bits:
            gu_shape, dn_shape = self._frozen_shapes
            gu = QuantizedTensor(self.frozen_gate_up_qdata, self.frozen_gate_up_scales.float(), self.quantize_bits,
                                 self.quantize_group_size, gu_shape, dtype)
            dn = QuantizedTensor(self.frozen_down_qdata, self.frozen_down_scales.float(), self.quantize_bits,
                                 self.quantize_group_size, dn_shape, dtype)
            return gu, dn
        return self.frozen_gate_up.to(dtype), self.frozen_down.to(dtype)

    def stacks(self):
        """(gate_up list, down list, gate_up_bias list or None, down_bias list or None), trainable
        stack first; the order matches :attr:`group_of_expert`."""
        dtype = self._dtype()
        gu, dn, b1, b2 = [], [], [], []
        if self.tuned_gate_up is not None:
            gu.append(self.tuned_gate_up)
            dn.append(self.tuned_down)
            if self.has_bias:
                b1.append(self.tuned_gate_up_bias)
                b2.append(self.tuned_down_bias)
        if self._frozen_groups:
            fgu, fdn = self._frozen_stacks(dtype)
            gu.append(fgu)
            dn.append(fdn)
            if self.has_bias:
                b1.append(self.frozen_gate_up_bias.to(dtype))
                b2.append(self.frozen_down_bias.to(dtype))
        if not self.has_bias:
            return gu, dn, None, None
        return gu, dn, b1, b2

    def group_weights(self, group: int) -> ExpertWeights:
        """Current weights of group ``group`` (caller's numbering), detached; frozen quantized
        groups are dequantized."""
        if not 0 <= group < self.num_groups:
            raise LayoutIndexError(f"group {group} is out of range [0, {self.num_groups})")
        i = self._internal[group]
        if self.trainable[group]:
            return ExpertWeights(
                self.tuned_gate_up[i].detach(), self.tuned_down[i].detach(),
                self.tuned_gate_up_bias[i].detach() if self.has_bias else None,
                self.tuned_down_bias[i].detach() if self.has_bias else None,
            )
        j = i - self.num_tuned
        gu, dn = self._frozen_stacks(self._dtype())
        if isinstance(gu, QuantizedTensor):
            gu, dn = gu[j].dequantize(), dn[j].dequantize()
        else:
            gu, dn = gu[j], dn[j]
        return ExpertWeights(
            gu.detach(), dn.detach(),
            self.frozen_gate_up_bias[j].detach() if self.has_bias else None,
            self.frozen_down_bias[j].detach() if self.has_bias else None,
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.tuned_gate_up, self.tuned_down, self.tuned_gate_up_bias, self.tuned_down_bias)
                if p is not None]

    def extra_repr(self) -> str:
        q = ""
        if self.quantize_bits:
            q = ", frozen nf4" if self.quantize_bits == NF4 else f", frozen int{self.quantize_bits}"
        return (f"experts={self.num_experts}, groups={self.num_groups} ({self.num_tuned} trainable, "
                f"{self.num_frozen} frozen{q}), dropped={len(self.dropped_experts)}")


def _strip_from_parent_state_dict(module, state_dict, prefix, local_metadata):
    """Keep checkpoints in the original format: a view's tensors are not part of the model's
    state_dict (``view.state_dict()`` called directly, prefix '', still returns them)."""
    if not prefix:
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_from_self(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Loading an original-format checkpoint into a model with a view: keep the view's tensors."""
    if not prefix:
        return
    for name, p in module._parameters.items():
        if p is not None and prefix + name not in state_dict:
            state_dict[prefix + name] = p.detach()
