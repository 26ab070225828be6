"""Handles returned by :func:`flux.moe.patch`: one per model, one per MoE layer.

A :class:`MoELayerHandle` owns the FLUX state of one layer:

* ``counts`` (int64 [E], a non-persistent buffer ``flux_counts`` on the layer's module, so it
  follows ``model.to(device)`` and stays out of checkpoints): tokens routed to each original
  expert since the last :meth:`reset_counts`, incremented on device without host sync.
  Recomputation during backward (gradient checkpointing) is not counted twice.
* the expert weights by original index (:meth:`expert_weights`, :meth:`set_expert_weights`);
* an optional merged-expert view (:meth:`install_view`, :meth:`install_merged_view`,
  :meth:`remove_view`, module ``flux_view``).

Where the weights live and how they are laid out is the business of an :class:`ExpertSource`
(flux/moe/interface.py for transformers experts modules, flux/moe/modulelist.py for ModuleList
blocks); the handle only talks to that interface.
"""
from __future__ import annotations

import operator
import warnings
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from flux import quant_bnb
from flux.moe.compute import run_experts
from flux.moe.merged_view import (FROZEN_QUANTIZATIONS, NF4, ExpertWeights, LayoutError, LayoutIndexError, MergedView,
                                  validate_layout)

COUNTS_BUFFER = "flux_counts"
VIEW_MODULE = "flux_view"
LAYER_ATTR = "_flux_layer"


class ExpertSource:
    """Access to one layer's original expert weights (subclasses: interface.py, modulelist.py).

    Attributes set by subclasses: ``owner`` (module that gets the counts buffer and the view),
    ``num_experts``, ``hidden_size``, ``intermediate_size``, ``has_bias``, ``activation``
    ('silu' | 'gelu', or None when the layer's GLU is not expressible by the op and the layer
    runs its original code), ``fallback_reason``, ``kind``.
    """

    kind = "source"
    owner: nn.Module
    num_experts: int
    hidden_size: int
    intermediate_size: int
    has_bias: bool = False
    activation: Optional[str] = None
    fallback_reason: Optional[str] = None

    def __init__(self) -> None:
        self._released: list[tuple[nn.Module, str, nn.Parameter]] = []

    # --- to implement
    def full_stacks(self) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """Differentiable (gate_up [E, 2I, H], down [E, H, I], gate_up_bias [E, 2I] | None,
        down_bias [E, H] | None) computed from the original parameters."""
        raise NotImplementedError

    def expert(self, index: int) -> ExpertWeights:
        raise NotImplementedError

    def write_expert(self, index: int, weights: ExpertWeights) -> None:
        raise NotImplementedError

    def parameter_slots(self) -> list[tuple[nn.Module, str]]:
        """(module, attribute) of every original expert tensor (weights and biases)."""
        raise NotImplementedError

    def fallback(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no fallback path")

    def expert_layout(self, index: int) -> tuple[int, int, bool]:
        """(hidden, intermediate, has_bias) of expert ``index`` (the layer's, unless a fallback
        layer's experts differ)."""
        return self.hidden_size, self.intermediate_size, self.has_bias

    supports_view = False  # merged views on a layer that is not native (see interface.py)

    def fallback_view(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, view) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no fallback path for merged views")

    def attach(self, layer: "MoELayerHandle") -> None:
        """Route the layer's computation through ``layer.forward``."""
        raise NotImplementedError

    def detach(self) -> None:
        """Undo :meth:`attach`."""
        raise NotImplementedError

    # --- common
    def expert_parameters(self) -> list[nn.Parameter]:
        return [getattr(m, n) for m, n in self.parameter_slots()]

    @property
    def released(self) -> bool:
        return bool(self._released)

    @property
    def dtype(self) -> torch.dtype:
        return self.expert_parameters()[0].dtype

    @property
    def device(self) -> torch.device:
        buf = self.owner._buffers.get(COUNTS_BUFFER)
        if buf is not None:
            return buf.device
        return self.expert_parameters()[0].device

    def release(self) -> None:
        """Free the original expert tensors (a merged view serves the layer meanwhile).  The
        Parameter objects survive (optimizers may hold them) with empty storage; the module
        shows a meta placeholder of the original shape."""
        if self._released:
            return
        for module, name in self.parameter_slots():
            original = module._parameters[name]
            module._parameters[name] = nn.Parameter(
                torch.empty_like(original, device="meta"), requires_grad=original.requires_grad
            )
            original.data = torch.empty(0, dtype=original.dtype, device=original.device)
            self._released.append((module, name, original))

    def reinstate(self) -> None:
        """Give the released Parameter objects fresh (uninitialised) storage of their shape and
        put them back; the caller writes the values."""
        for module, name, original in self._released:
            placeholder = module._parameters[name]
            original.data = torch.empty(placeholder.shape, dtype=original.dtype, device=original.device)
            module._parameters[name] = original
        self._released = []


class MoELayerHandle:
    """FLUX state of one MoE layer (see the module docstring)."""

    def __init__(self, source: ExpertSource, *, index: int, name: str, top_k: Optional[int],
                 router: Optional[nn.Module]) -> None:
        self.source = source
        self.index = index
        self.name = name
        self.router = router
        self._top_k = top_k
        self._identity: Optional[Tensor] = None
        self.layer_idx: Optional[int] = None  # the number in the module path (model.layers.<n>...)
        self.peft_wrapped = False
        self.last_aux_loss: Optional[Tensor] = None  # ModuleList blocks: the gate's aux loss, last call
        owner = source.owner
        if COUNTS_BUFFER in owner._buffers or hasattr(owner, LAYER_ATTR):
            raise RuntimeError(f"{name} is already patched by FLUX")
        owner.register_buffer(COUNTS_BUFFER, torch.zeros(source.num_experts, dtype=torch.int64,
                                                          device=source.device), persistent=False)
        owner.__dict__[LAYER_ATTR] = self
        source.attach(self)

    # ------------------------------------------------------------------ description
    @property
    def num_experts(self) -> int:
        return self.source.num_experts

    @property
    def top_k(self) -> Optional[int]:
        """Experts per token (from the router/config; else the last batch seen; None before)."""
        return self._top_k

    @property
    def hidden_size(self) -> int:
        return self.source.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.source.intermediate_size

    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def native(self) -> bool:
        """True when the layer runs through flux.ops.merged_moe (False: transformers' own code)."""
        return self.source.activation is not None

    @property
    def fallback_reason(self) -> Optional[str]:
        return self.source.fallback_reason

    @property
    def counts(self) -> Tensor:
        """int64 [E]: tokens routed to each original expert since the last reset_counts()."""
        return self.source.owner._buffers[COUNTS_BUFFER]

    def reset_counts(self) -> None:
        self.counts.zero_()

    @property
    def view(self) -> Optional[MergedView]:
        return self.source.owner._modules.get(VIEW_MODULE)

    def __repr__(self) -> str:
        mode = "native" if self.native else f"fallback ({self.fallback_reason})"
        view = f", view: {self.view.extra_repr()}" if self.view is not None else ""
        return (f"MoELayerHandle({self.index}: {self.name}, {self.kind}, experts={self.num_experts}, "
                f"top_k={self.top_k}, {mode}{view})")

    # ------------------------------------------------------------------ compute
    def count(self, topk_ids: Tensor) -> None:
        # a forward re-run inside backward (activation checkpointing) routes the same tokens again
        if torch._C._current_graph_task_id() != -1:
            return
        flat = topk_ids.reshape(-1).to(torch.int64)
        counts = self.counts
        if flat.device != counts.device:
            flat = flat.to(counts.device)
        # ids outside [0, E) (expert-parallel sentinels, -1 for a dropped token) are not counted;
        # masking, not filtering: no host sync
        valid = (flat >= 0) & (flat < counts.shape[0])
        counts.scatter_add_(0, flat.clamp(0, counts.shape[0] - 1), valid.to(torch.int64))

    def _identity_groups(self, device: torch.device) -> Tensor:
        ident = self._identity
        if ident is None or ident.device != device:
            ident = torch.arange(self.num_experts, dtype=torch.int32, device=device)
            self._identity = ident
        return ident

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, *, count: bool = True) -> Tensor:
        """The layer's expert output y [T, H] for x [T, H] and the router's choices [T, k]."""
        tokens = x.shape[0]
        topk_ids = topk_ids.reshape(tokens, -1)
        topk_weights = topk_weights.reshape(tokens, -1)
        if self._top_k is None:
            self._top_k = topk_ids.shape[1]
        if count:
            self.count(topk_ids)
        view = self.view
        if view is not None:
            if self.source.activation is None:
                return self.source.fallback_view(x, topk_ids, topk_weights, view)
            gu, dn, b1, b2 = view.stacks()
            return run_experts(x, topk_ids, topk_weights, gu, dn, view.group_of_expert, self.source.activation, b1, b2)
        if self.source.activation is None:
            return self.source.fallback(x, topk_ids, topk_weights)
        gu, dn, b1, b2 = self.source.full_stacks()
        return run_experts(
            x, topk_ids, topk_weights, [gu], [dn], self._identity_groups(x.device), self.source.activation,
            None if b1 is None else [b1], None if b2 is None else [b2],
        )

    # ------------------------------------------------------------------ weights
    def _check_expert(self, index: int) -> int:
        if isinstance(index, Tensor) and index.numel() == 1 and not index.is_floating_point():
            index = int(index)
        if isinstance(index, bool):
            raise TypeError("expert index must be an int, got bool")
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"expert index must be an int, got {type(index).__name__}") from None
        if not 0 <= index < self.num_experts:
            raise LayoutIndexError(f"{self.name}: expert {index} is out of range [0, {self.num_experts})")
        return index

    def expert_weights(self, index: int) -> ExpertWeights:
        """Weights of original expert ``index`` in the transformers 5.x layout (detached; may
        share storage with the model).  Under a merged view, a tuning expert reads its trainable
        group (the updated weights); other experts read the originals."""
        index = self._check_expert(index)
        view = self.view
        if view is not None:
            group = view.expert_to_group[index]
            if group >= 0 and view.trainable[group]:
                return view.group_weights(group)
            if self.source.released:
                raise RuntimeError(
                    f"{self.name}: expert {index} is not a tuning expert of the view and the original "
                    "weights were released (install_view(keep_originals=False))"
                )
        return self.source.expert(index)

    def set_expert_weights(self, index: int, weights: ExpertWeights) -> None:
        """Overwrite original expert ``index`` in place (the model's Parameters keep their identity).
        Under a view, a tuning expert's trainable group is updated too."""
        index = self._check_expert(index)
        self._check_expert_shapes(weights, f"weights of expert {index}", *self.source.expert_layout(index))
        view = self.view
        if view is not None:
            group = view.expert_to_group[index]
            if group >= 0 and view.trainable[group]:
                i = view._internal[group]
                with torch.no_grad():
                    view.tuned_gate_up[i].copy_(weights.gate_up)
                    view.tuned_down[i].copy_(weights.down)
                    if view.has_bias:
                        view.tuned_gate_up_bias[i].copy_(weights.gate_up_bias)
                        view.tuned_down_bias[i].copy_(weights.down_bias)
        if not self.source.released:
            self.source.write_expert(index, weights)

    def _check_expert_shapes(self, w: ExpertWeights, what: str, h: Optional[int] = None, i: Optional[int] = None,
                             has_bias: Optional[bool] = None) -> None:
        h = self.hidden_size if h is None else h
        i = self.intermediate_size if i is None else i
        has_bias = self.source.has_bias if has_bias is None else has_bias
        if tuple(w.gate_up.shape) != (2 * i, h):
            raise LayoutError(f"{self.name}: {what}: gate_up has shape {tuple(w.gate_up.shape)}, expected {(2 * i, h)}")
        if tuple(w.down.shape) != (h, i):
            raise LayoutError(f"{self.name}: {what}: down has shape {tuple(w.down.shape)}, expected {(h, i)}")
        if has_bias and (w.gate_up_bias is None or w.down_bias is None):
            raise LayoutError(f"{self.name}: {what}: the experts have biases; gate_up_bias and down_bias are required")

    # ------------------------------------------------------------------ merged view
    def install_view(
        self,
        expert_to_group,
        gate_up: Tensor,
        down: Tensor,
        trainable: Sequence[bool],
        *,
        gate_up_bias: Optional[Tensor] = None,
        down_bias: Optional[Tensor] = None,
        quantize_bits: Optional[int | str] = None,
        quantize_group_size: int = 64,
        keep_originals: bool = True,
    ) -> MergedView:
        """Serve the layer's E experts by G groups.

        Args:
            expert_to_group: int [E]: group of each original expert, -1 drops it.  Every group
                must serve at least one expert.
            gate_up: [G, 2I, H], down: [G, H, I] group weights (copied into the view).
            trainable: G flags.  Trainable groups become one ``nn.Parameter`` stack
                (``view.tuned_gate_up`` / ``view.tuned_down``); frozen groups a buffer stack.
            gate_up_bias / down_bias: [G, 2I] / [G, H], required iff the experts have biases.
            quantize_bits: 4 or 8 stores the frozen groups as flux.ops.QuantizedTensor, 'nf4' as
                bitsandbytes NF4 (block ``quantize_group_size``; needs bitsandbytes).
            keep_originals: False frees the original expert tensors while the view is installed
                (memory); :meth:`remove_view` then needs ``full_weights``.

        Raises:
            LayoutError (a ValueError; LayoutIndexError is also an IndexError) naming the bad
            value for a wrong expert or group count, out-of-range index or shape mismatch.
        """
        if not self.native and not getattr(self.source, "supports_view", False):
            raise NotImplementedError(
                f"{self.name}: merged views need a layer that runs through flux.ops.merged_moe or a gated "
                f"experts module; this one falls back to its original code ({self.fallback_reason})"
            )
        if self.view is not None:
            raise RuntimeError(f"{self.name}: a merged view is already installed; remove_view() first")
        if getattr(self, "peft_wrapped", False):
            warnings.warn(
                f"{self.name}: PEFT adapts this layer's expert parameters (target_parameters); a merged view "
                "serves the layer from its own group weights, so those LoRA deltas are not applied while it is "
                "installed (merge them first, e.g. merge_and_unload)",
                RuntimeWarning,
                stacklevel=2,
            )
        if quantize_bits not in FROZEN_QUANTIZATIONS:
            raise LayoutError(f"{self.name}: quantize_bits must be None, 4 or 8, got {quantize_bits!r} "
                              "(or 'nf4': bitsandbytes NF4)")
        if quantize_bits == NF4 and quantize_group_size not in quant_bnb.BLOCKSIZES:
            raise LayoutError(f"{self.name}: NF4 frozen groups need quantize_group_size in {quant_bnb.BLOCKSIZES} "
                              f"(bitsandbytes block sizes), got {quantize_group_size!r}")
        e2g, flags = validate_layout(
            layer=self.name, num_experts=self.num_experts, hidden=self.hidden_size,
            intermediate=self.intermediate_size, has_bias=self.source.has_bias, expert_to_group=expert_to_group,
            gate_up=gate_up, down=down, trainable=trainable, gate_up_bias=gate_up_bias, down_bias=down_bias,
        )
        view = MergedView(
            expert_to_group=e2g, trainable=flags, gate_up=gate_up, down=down, gate_up_bias=gate_up_bias,
            down_bias=down_bias, dtype=self.source.dtype, device=self.source.device,
            quantize_bits=quantize_bits, quantize_group_size=quantize_group_size,
        )
        self.source.owner.add_module(VIEW_MODULE, view)
        if not keep_originals:
            self.source.release()
        return view

    def merged_groups(
        self,
        tuning: Sequence[int],
        clusters: Sequence[Sequence[int]] = (),
        *,
        weights: Optional[Sequence[float] | Tensor] = None,
        drop: Sequence[int] = (),
    ) -> dict:
        """The FLUX layout as ``install_view`` arguments: each tuning expert is its own trainable
        group (in the order given), each cluster one frozen group holding the ``weights``-weighted
        average of its members (uniform if None), ``drop`` experts are dropped.  Every expert must
        appear exactly once."""
        e = self.num_experts
        seen: dict[int, str] = {}

        def claim(idx, what):
            idx = self._check_expert(idx)
            if idx in seen:
                raise LayoutError(f"{self.name}: expert {idx} appears twice ({seen[idx]} and {what})")
            seen[idx] = what
            return idx

        tuning = [claim(i, "tuning") for i in tuning]
        clusters = [[claim(i, f"cluster {c}") for i in members] for c, members in enumerate(clusters)]
        for c, members in enumerate(clusters):
            if not members:
                raise LayoutError(f"{self.name}: cluster {c} is empty")
        drop = [claim(i, "drop") for i in drop]
        missing = [i for i in range(e) if i not in seen]
        if missing:
            raise LayoutError(f"{self.name}: experts {missing} are neither tuning, in a cluster nor dropped")
        if weights is None:
            alpha = torch.ones(e, dtype=torch.float64)
        else:
            alpha = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if alpha.numel() != e:
                raise LayoutError(f"{self.name}: weights has {alpha.numel()} entries, expected {e} (one per expert)")
        e2g = [-1] * e
        gate_up, down, b1, b2 = [], [], [], []
        for g, idx in enumerate(tuning):
            e2g[idx] = g
            w = self.expert_weights(idx)
            gate_up.append(w.gate_up.detach().clone())
            down.append(w.down.detach().clone())
            b1.append(w.gate_up_bias)
            b2.append(w.down_bias)
        for c, members in enumerate(clusters):
            g = len(tuning) + c
            a = alpha[members]
            if float(a.sum()) <= 0:
                raise LayoutError(f"{self.name}: cluster {c} has non-positive total weight {float(a.sum())}")
            ws = [self.expert_weights(i) for i in members]
            for i in members:
                e2g[i] = g
            # Eq. 2 has one home (flux.merging.merge); imported here, not at the top: flux.merging
            # imports this module
            from flux.merging.merge import merge_cluster

            gate_up.append(merge_cluster([w.gate_up for w in ws], a))
            down.append(merge_cluster([w.down for w in ws], a))
            if self.source.has_bias:
                b1.append(merge_cluster([w.gate_up_bias for w in ws], a))
                b2.append(merge_cluster([w.down_bias for w in ws], a))
        if not gate_up:
            raise LayoutError(f"{self.name}: every expert is dropped; a view needs at least one group")
        out = dict(expert_to_group=e2g, gate_up=torch.stack(gate_up), down=torch.stack(down),
                   trainable=[True] * len(tuning) + [False] * len(clusters))
        if self.source.has_bias:
            out["gate_up_bias"] = torch.stack(b1)
            out["down_bias"] = torch.stack(b2)
        return out

    def install_merged_view(
        self,
        tuning: Sequence[int],
        clusters: Sequence[Sequence[int]] = (),
        *,
        weights: Optional[Sequence[float] | Tensor] = None,
        drop: Sequence[int] = (),
        quantize_bits: Optional[int | str] = None,
        quantize_group_size: int = 64,
        keep_originals: bool = True,
    ) -> MergedView:
        """:meth:`merged_groups` then :meth:`install_view`."""
        layout = self.merged_groups(tuning, clusters, weights=weights, drop=drop)
        return self.install_view(**layout, quantize_bits=quantize_bits, quantize_group_size=quantize_group_size,
                                 keep_originals=keep_originals)

    def tuned_weights(self) -> dict[int, ExpertWeights]:
        """{original expert index: current weights} for the experts served by trainable groups."""
        view = self.view
        if view is None:
            return {}
        return {e: view.group_weights(view.expert_to_group[e]) for e in view.tuned_experts}

    def sync_view(self) -> None:
        """Write the tuning experts' current weights into the original parameters."""
        view = self.view
        if view is None or self.source.released:
            return
        for e, w in self.tuned_weights().items():
            self.source.write_expert(e, w)

    def remove_view(self, *, write_back: bool = True, full_weights: Optional[dict] = None) -> None:
        """Return to the full expert set.

        Args:
            write_back: copy the tuning experts' trained weights into the original parameters.
            full_weights: needed when the originals were released: ``{"gate_up": [E, 2I, H],
                "down": [E, H, I]}`` (plus ``gate_up_bias``/``down_bias`` for biased experts) to
                put back before the write-back.
        """
        view = self.view
        if view is None:
            return
        if self.source.released:
            if full_weights is None:
                raise RuntimeError(
                    f"{self.name}: the original expert weights were released by install_view(keep_originals=False); "
                    "pass full_weights={'gate_up': [E, 2I, H], 'down': [E, H, I]} to remove_view"
                )
            gu, dn = full_weights["gate_up"], full_weights["down"]
            b1, b2 = full_weights.get("gate_up_bias"), full_weights.get("down_bias")
            for name, t, shape in (("gate_up", gu, (self.num_experts, 2 * self.intermediate_size, self.hidden_size)),
                                   ("down", dn, (self.num_experts, self.hidden_size, self.intermediate_size))):
                if tuple(t.shape) != shape:
                    raise LayoutError(f"{self.name}: full_weights[{name!r}] has shape {tuple(t.shape)}, expected {shape}")
            tuned = self.tuned_weights() if write_back else {}
            self.source.reinstate()
            for e in range(self.num_experts):
                self.source.write_expert(e, ExpertWeights(gu[e], dn[e], None if b1 is None else b1[e],
                                                          None if b2 is None else b2[e]))
            for e, w in tuned.items():
                self.source.write_expert(e, w)
        elif write_back:
            self.sync_view()
        del self.source.owner._modules[VIEW_MODULE]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The view's trainable stacks, or (no view) the original expert parameters."""
        view = self.view
        if view is not None:
            return view.trainable_parameters()
        return self.source.expert_parameters()

    # ------------------------------------------------------------------ restore
    def _restore(self, write_back: bool = True) -> None:
        if self.view is not None:
            if self.source.released:
                raise RuntimeError(
                    f"{self.name}: cannot restore while a view with released originals is installed; "
                    "call remove_view(full_weights=...) first"
                )
            self.remove_view(write_back=write_back)
        self.source.detach()
        owner = self.source.owner
        owner._buffers.pop(COUNTS_BUFFER, None)
        owner.__dict__.pop(LAYER_ATTR, None)


class PatchHandle:
    """Returned by :func:`flux.patch`.  ``moe_layers``: one :class:`MoELayerHandle` per MoE layer
    in depth order.  :meth:`restore` (or ``flux.unpatch(model)``) puts the original layout back."""

    def __init__(self, model: nn.Module, layers: list[MoELayerHandle], restore_actions: list) -> None:
        self.model = model
        self.moe_layers = layers
        self._restore_actions = restore_actions
        self.restored = False

    def __len__(self) -> int:
        return len(self.moe_layers)

    def __iter__(self) -> Iterator[MoELayerHandle]:
        return iter(self.moe_layers)

    def __getitem__(self, i: int) -> MoELayerHandle:
        return self.moe_layers[i]

    def __repr__(self) -> str:
        state = "restored" if self.restored else f"{len(self.moe_layers)} MoE layers"
        return f"PatchHandle({type(self.model).__name__}, {state})"

    def reset_counts(self) -> None:
        for layer in self.moe_layers:
            layer.reset_counts()

    def counts(self) -> list[Tensor]:
        return [layer.counts for layer in self.moe_layers]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.moe_layers for p in layer.trainable_parameters()]

    def remove_views(self, *, write_back: bool = True) -> None:
        for layer in self.moe_layers:
            layer.remove_view(write_back=write_back)

    def restore(self, *, write_back: bool = True) -> None:
        """Remove views (writing tuning experts back unless ``write_back=False``), unhook every
        layer and reselect the experts implementation that was active before."""
        if self.restored:
            return
        for layer in self.moe_layers:
            layer._restore(write_back=write_back)
        for action in reversed(self._restore_actions):
            action()
        self.restored = True
        self.model.__dict__.pop("_flux_patch_handle", None)
