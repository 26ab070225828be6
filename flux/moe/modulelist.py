"""MoE blocks whose experts are an ``nn.ModuleList`` of gated MLPs (remote code such as
DeepSeek-MoE v1 / LLaMA-MoE), described by an adapter (flux/moe/adapters.py).

Patching replaces the block's ``forward`` on the instance (restore puts back what was there):
the adapter's ``route`` calls the block's own gate, the routed experts run as one
``flux.ops.merged_moe`` call, and the adapter's ``combine`` adds shared experts / aux loss.  The
expert MLPs stay where they are (state_dict keys, optimizers and restore are unaffected): in the
full layout their weights are stacked into [E, 2I, H] / [E, H, I] per call with
``torch.stack`` / ``torch.cat`` (differentiable, so gradients land in the original
``nn.Linear`` parameters); when no gradient is needed the stacks are cached until a weight
changes (tensor version counters).  Expert Linear biases are supported (flux/moe/compute.py).

A block the op cannot run keeps its forward (a warning, never an error; counts through a forward
hook on its gate): an activation that is not SiLU / exact GELU, or that no probe identifies
(inline activations are found by probing the whole expert, flux/moe/glu.py), experts of
different shapes or dtypes, mixed biases, projections that are not plain ``nn.Linear`` compute
(quantized layers).  A gate whose output turns out, on the first forward, not to be a top-k
choice over the block's experts demotes the layer the same way; that call replays the gate's
output into the block's own forward, so the gate and its hooks run once.
"""
from __future__ import annotations

import types
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from flux.moe.adapters import GateOutputError, ModuleListAdapter, Routing, parse_gate_output
from flux.moe.glu import ACTIVATION_ALIASES, ACTIVATIONS, KNOWN_ACTIVATIONS, identify_activation, probe_expert
from flux.moe.handle import LAYER_ATTR, ExpertSource
from flux.moe.merged_view import ExpertWeights


def _block_forward(block: nn.Module, hidden_states: Tensor, *args, **kwargs):
    layer = block.__dict__[LAYER_ATTR]
    source = layer.source
    adapter = source.adapter
    try:
        routing = adapter.route(block, hidden_states, *args, **kwargs)
    except GateOutputError as err:
        return source.demote(layer, str(err), hidden_states, args, kwargs, err.output)
    hidden = hidden_states.shape[-1]
    x = hidden_states.reshape(-1, hidden)
    if not source.routing_checked and x.shape[0] > 0:
        problem = _routing_problem(routing, x.shape[0], source.num_experts)
        if problem is not None:
            return source.demote(layer, problem, hidden_states, args, kwargs, routing.raw)
        source.routing_checked = True
    y = layer.forward(x, routing.topk_ids.reshape(x.shape[0], -1), routing.topk_weights.reshape(x.shape[0], -1))
    return adapter.combine(block, hidden_states, y.view(hidden_states.shape), routing, layer)


def _routing_problem(routing: Routing, tokens: int, num_experts: int) -> Optional[str]:
    """Why ``routing`` is not a top-k choice over ``num_experts`` experts for ``tokens`` tokens
    (None if it is).  Checked on a layer's first forward only: the range check syncs the host."""
    ids, w = routing.topk_ids, routing.topk_weights
    if not isinstance(ids, Tensor) or not isinstance(w, Tensor):
        return f"route() returned ids {type(ids).__name__} and weights {type(w).__name__}, not tensors"
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or not w.is_floating_point():
        return f"route() returned ids of dtype {ids.dtype} and weights of dtype {w.dtype}"
    if ids.numel() != w.numel() or ids.numel() == 0 or ids.numel() % tokens:
        return (f"route() returned ids {tuple(ids.shape)} and weights {tuple(w.shape)}, "
                f"not [{tokens}, k] for the {tokens} tokens of the batch")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_experts:
        return f"route() returned expert ids in [{lo}, {hi}], outside [0, {num_experts})"
    return None


class _ReplayGate(nn.Module):
    """Stands in for a block's gate during one call of the block's own forward: a call on the
    same input tensor gets the output the gate already produced (so the gate, its hooks and its
    RNG draws run once); anything else goes to the gate itself."""

    def __init__(self, gate: nn.Module, output: Any, gate_input: Tensor) -> None:
        super().__init__()
        # plain attributes, not submodules: nothing is registered on the model
        self.__dict__["_gate"] = gate
        self.__dict__["_pending"] = (output, gate_input)
        self.training = gate.training  # nn.Module's own attribute: would not reach __getattr__

    def forward(self, *args, **kwargs):
        pending = self.__dict__["_pending"]
        if pending is not None and args and args[0] is pending[1] and not kwargs:
            self.__dict__["_pending"] = None
            return pending[0]
        return self.__dict__["_gate"](*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_gate"], name)


def _structure_problem(block: nn.Module, projs: list, hidden: int, inter: int, has_bias: bool) -> Optional[str]:
    """Why the experts' projections cannot be stacked into [E, 2I, H] / [E, H, I] (None if they can)."""
    want = ((inter, hidden),) * 2 + ((hidden, inter),)
    first = projs[0][0].weight
    for e, trio in enumerate(projs):
        for lin in trio:
            if type(lin).forward is not nn.Linear.forward:
                # a quantized / custom Linear: its weight tensor is not what its forward multiplies by
                return f"expert {e} has a {type(lin).__name__} projection whose forward is not nn.Linear's"
        shapes = tuple(tuple(lin.weight.shape) for lin in trio)
        if shapes != want:
            return f"expert {e} has projection shapes {shapes}, expected {want} (experts of different shapes)"
        biases = tuple(lin.bias is not None for lin in trio)
        if biases != (has_bias,) * 3:
            return f"expert {e} mixes biased and unbiased projections {biases}"
        for lin in trio:
            for t in lin.parameters(recurse=False):
                if not t.is_floating_point() or t.dtype != first.dtype or t.device != first.device:
                    return (f"expert {e} has a {t.dtype} tensor on {t.device}; the stacks need one floating "
                            f"dtype and device ({first.dtype} on {first.device})")
    return None


def _resolve_activation(adapter: ModuleListAdapter, block: nn.Module, expert: nn.Module,
                        projs: tuple) -> tuple[Optional[str], str]:
    """(name of the expert's activation or None, how it was found / why not).  The name is a key
    of KNOWN_ACTIVATIONS; whether the kernel runs it is the caller's question."""
    act = adapter.activation(block, expert)
    if act is None:  # written inline in forward: probe the whole expert
        name, detail = probe_expert(expert, projs)
        if name is None:
            return None, (f"{type(expert).__name__}.forward: no act in {', '.join(KNOWN_ACTIVATIONS)} gives "
                          f"down(act(gate(x)) * up(x)) on the probe ({detail})")
        return name, f"probed {type(expert).__name__}.forward ({detail})"
    if isinstance(act, str):  # stated by the adapter: an unknown name is the adapter author's mistake
        name = ACTIVATION_ALIASES.get(act.lower())
        if name is None:
            raise ValueError(f"{type(adapter).__name__}.activation returned {act!r}; known names: "
                             f"{', '.join(sorted(ACTIVATION_ALIASES))} (or return a callable, or None to probe)")
        return name, f"stated by {type(adapter).__name__}.activation"
    if not callable(act):
        raise TypeError(f"{type(adapter).__name__}.activation returned {type(act).__name__}; "
                        "expected a callable, an activation name or None")
    device = projs[0].weight.device if projs[0].weight.device.type != "meta" else "cpu"
    name = identify_activation(act, device)
    if name is None:
        return None, f"activation {type(act).__name__} is none of {', '.join(KNOWN_ACTIVATIONS)}"
    return name, f"{type(act).__name__} probed elementwise"


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
        projs = [tuple(adapter.projections(block, e)) for e in experts]
        g0 = projs[0][0]
        self.num_experts = len(experts)
        # in/out_features, not weight.shape: a quantized Linear's weight may be packed
        self.intermediate_size, self.hidden_size = g0.out_features, g0.in_features
        self.has_bias = g0.bias is not None
        self.projs = projs
        self._cache: Optional[tuple] = None
        self._hook = None
        self._previous_forward: Optional[Callable] = None
        self._counting = True
        self.routing_checked = False
        self.activation = None
        reason = _structure_problem(block, projs, self.hidden_size, self.intermediate_size, self.has_bias)
        if reason is None:
            # one probe per expert class (normally one): all must compute the same activation
            names = {}
            for e, expert in enumerate(experts):
                if type(expert) in names:
                    continue
                name, detail = _resolve_activation(adapter, block, expert, projs[e])
                names[type(expert)] = name
                if name is None:
                    reason = detail
                    break
                if name not in ACTIVATIONS:
                    reason = (f"activation {name} ({detail}) is not supported by flux.ops.merged_moe "
                              f"({', '.join(ACTIVATIONS)})")
                    break
            if reason is None and len(set(names.values())) > 1:
                reason = f"its experts compute different activations {sorted(set(names.values()))}"
            if reason is None:
                self.activation = next(iter(names.values()))
        self.fallback_reason = reason
        if reason is not None:
            self._warn(f"{type(block).__name__} keeps its original forward ({reason}); "
                       "counts are recorded, merged views are not available.", stacklevel=4)

    @staticmethod
    def _warn(message: str, stacklevel: int = 3) -> None:
        warnings.warn(f"flux.patch: {message}", RuntimeWarning, stacklevel=stacklevel)

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

    def expert_layout(self, index: int) -> tuple[int, int, bool]:
        g, u, d = self.projs[index]
        return g.in_features, g.out_features, any(lin.bias is not None for lin in (g, u, d))

    def expert(self, index: int) -> ExpertWeights:
        g, u, d = self.projs[index]
        b1 = b2 = None
        if any(lin.bias is not None for lin in (g, u, d)):
            # a fallback block may bias only some projections: a missing bias reads as zeros
            def bias(lin):
                return lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features).detach()

            b1, b2 = torch.cat((bias(g), bias(u))), bias(d)
        return ExpertWeights(torch.cat((g.weight, u.weight)).detach(), d.weight.detach(), b1, b2)

    @torch.no_grad()
    def write_expert(self, index: int, weights: ExpertWeights) -> None:
        g, u, d = self.projs[index]
        i = g.out_features  # this expert's own size (a fallback block may mix sizes)
        g.weight.copy_(weights.gate_up[:i])
        u.weight.copy_(weights.gate_up[i:])
        d.weight.copy_(weights.down)
        if weights.gate_up_bias is not None:
            if g.bias is not None:
                g.bias.copy_(weights.gate_up_bias[:i])
            if u.bias is not None:
                u.bias.copy_(weights.gate_up_bias[i:])
        if weights.down_bias is not None and d.bias is not None:
            d.bias.copy_(weights.down_bias)

    def parameter_slots(self):
        slots = []
        for trio in self.projs:
            for lin in trio:
                slots.append((lin, "weight"))
                if lin.bias is not None:  # per projection: a fallback block may mix
                    slots.append((lin, "bias"))
        return slots

    def release(self) -> None:
        super().release()
        self._cache = None

    # ------------------------------------------------------------------ hooking
    def attach(self, layer) -> None:
        # an instance forward set before us (e.g. accelerate's device hooks) is kept and restored
        self._previous_forward = self.block.__dict__.get("forward")
        if self.activation is not None:
            self.block.forward = types.MethodType(_block_forward, self.block)
        else:
            self._hook_counts(layer)

    def _hook_counts(self, layer) -> None:
        gate = self.adapter.gate(self.block)
        where = f"{type(self.block).__name__}.{getattr(self.adapter, 'gate_attr', 'gate')}"

        def count_hook(module, args, output):
            if not self._counting:
                return
            try:
                ids = parse_gate_output(output, where).topk_ids
            except GateOutputError as err:  # counting is a bonus on a fallback layer: never a crash
                self._counting = False
                self._warn(f"{layer.name}: counts are not recorded ({err})")
                return
            layer.count(ids)

        self._hook = gate.register_forward_hook(count_hook)

    def _restore_forward(self) -> None:
        self.block.__dict__.pop("forward", None)
        if self._previous_forward is not None:
            self.block.forward = self._previous_forward

    def demote(self, layer, problem: str, hidden_states: Tensor, args: tuple, kwargs: dict, gate_output: Any):
        """The gate's output is not a top-k choice over this block's experts (found on a forward):
        from now on the block runs its own forward, starting with this call; returns its output.

        No counts are recorded for such a gate.  With a merged view installed this raises
        GateOutputError instead: running the original experts would silently ignore the view."""
        name = type(self.block).__name__
        if layer.view is not None:
            raise GateOutputError(f"{layer.name}: a merged view is installed but {name}'s routing cannot be "
                                  f"used ({problem}); remove_view() and let the block run its own code", gate_output)
        self.activation = None
        self.fallback_reason = f"its gate's output is not a top-k choice: {problem}"
        self._warn(f"{layer.name} ({name}) runs its original forward from now on ({self.fallback_reason}); "
                   "counts are not recorded, merged views are not available.")
        self._restore_forward()
        self._cache = None
        forward = self.block.forward  # the block's own (or the one set before patching)
        gate = self.adapter.gate(self.block)
        attr = getattr(self.adapter, "gate_attr", "gate")
        # replay only what the built-in route computed: gate(hidden_states) on this very tensor
        replay = (gate_output is not None and type(self.adapter).route is ModuleListAdapter.route
                  and self.block._modules.get(attr) is gate)
        if not replay:
            return forward(hidden_states, *args, **kwargs)
        self.block._modules[attr] = _ReplayGate(gate, gate_output, hidden_states)
        try:
            return forward(hidden_states, *args, **kwargs)
        finally:
            self.block._modules[attr] = gate

    def detach(self) -> None:
        self._restore_forward()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._cache = None
