"""FMQ: every expert trains, held in int4 so the model fits (quantized training, no master copy).

Storage between steps, per MoE layer: the expert stacks ``gate_up`` [E, 2I, H] and ``down``
[E, H, I] as int4 :class:`flux.ops.QuantizedTensor` (group 64, fp32 scales), and their AdamW
moments quantized too (``exp_avg`` and ``sqrt(exp_avg_sq)``, 8-bit, or 4-bit when 8-bit does not
fit; storing the square root halves the dynamic range the quantizer has to cover).  There is no
full-precision master copy.

One local step:

1. forward/backward through the *dequantized* weights (the merged view's trainable stacks hold
   ``dequantize(Q)``); straight-through estimator: the gradient w.r.t. the dequantized weight is
   used as the gradient of the quantized one;
2. AdamW (the same betas/eps/lr as every other method) on a float working copy:
   ``w = deq(Q_w)``, ``m = deq(Q_m)``, ``v = deq(Q_s)^2``; the usual update;
3. re-quantize ``w`` to int4 with stochastic rounding (unbiased: an update smaller than half a
   quantization step still moves the weight in expectation; round-to-nearest would erase it),
   and ``m``, ``sqrt(v)`` to the moment precision.

Resident bytes (what a device running this holds; exact, from :func:`flux.moe.estimate_memory`
with ``LayerLayout(quantize_bits=...)`` for the quantized stacks): non-expert weights and their
training state + int4 expert weights + quantized moments + the float working set of one expert
(dequantized W, its gradient, dequantized m and v: the grouped expert computation walks the
experts one at a time, dequantizing each, and an expert is updated as soon as its layer's
backward has produced its gradient).  The simulation materialises every expert's working copy
at once (the view's float stacks) and steps after the whole backward; the numbers are the same
because the per-parameter updates are independent.

The uploaded delta of an expert is ``deq(Q_w) - W_global``: it includes the quantization error
of the starting point, which is what makes FMQ's global model oscillate.

``fmq.weight_format = "nf4"`` stores the weights as bitsandbytes NF4 instead (block 64, the same
0.5625 B/parameter plus a 64-B code book per stack; stochastic rounding on the NF4 grid,
:func:`flux.quant_bnb.stochastic_quantize`); the moments stay flux int8/int4.  The baseline is
defined with int4, which stays the default (docs/bitsandbytes.md).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from flux.federation.local import round_lr
from flux.federation.rng import Stream, participant_generator
from flux.federation.update import Update
from flux.methods.api import Method, RunContext, per_device_memory
from flux.ops import QuantizedTensor, quantize

WEIGHT_BITS = 4
WEIGHT_FORMATS = ("int4", "nf4")  # flux.federation.config.FMQ_WEIGHT_FORMATS (fmq.weight_format)
GROUP_SIZE = 64
MOMENT_BITS_CHOICES = (8, 4)  # best first; the first that fits is used
ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults, as train_local uses
ADAM_EPS = 1e-8
# random-stream id of the stochastic rounding (participant_generator's ``stream``)
ROUNDING_STREAM = Stream.FMQ_ROUNDING


def stochastic_quantize(w: Tensor, bits: int, group_size: int, generator: torch.Generator) -> QuantizedTensor:
    """Quantize ``w`` (float [..., C]) with the scales of round-to-nearest but rounding each value
    up or down at random, with probability given by its distance to the two grid points
    (E[dequantize] = w).  The group maxima sit on the grid, so the scales do not change."""
    nearest = quantize(w, bits=bits, group_size=group_size)
    cols = w.shape[-1]
    rows = w.reshape(-1, cols).float()
    step = nearest.scales.repeat_interleave(group_size, dim=1)[:, :cols]
    safe = torch.where(step > 0, step, torch.ones_like(step))
    noise = torch.rand(rows.shape, generator=generator).to(rows.device)
    qmax = 2 ** (bits - 1) - 1
    grid = torch.floor(rows / safe + noise).clamp_(-qmax, qmax) * step
    return quantize(grid.view(w.shape).to(w.dtype), bits=bits, group_size=group_size)


class QuantizedAdamW:
    """AdamW over parameters whose values live as int4 ``QuantizedTensor`` s (module docstring),
    or as NF4 :class:`flux.quant_bnb.BnbQuantized` with ``weight_format="nf4"``.

    ``params`` are the float tensors the model computes with (any shape, e.g. the stacks
    [E, 2I, H] / [E, H, I]); after :meth:`step` they hold ``dequantize`` of the new quantized
    weights and their gradients are zeroed.
    """

    def __init__(self, params: Sequence[nn.Parameter], *, lr: float, moment_bits: int,
                 generator: torch.Generator, weight_decay: float = 0.0, group_size: int = GROUP_SIZE,
                 weight_format: str = "int4") -> None:
        if moment_bits not in (4, 8):
            raise ValueError(f"moment_bits must be 4 or 8, got {moment_bits}")
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        if weight_format == "nf4":
            from flux import quant_bnb

            quant_bnb.require("fmq.weight_format = 'nf4'")
        self.params = list(params)
        self.lr, self.weight_decay = lr, weight_decay
        self.moment_bits, self.group_size = moment_bits, group_size
        self.weight_format = weight_format
        self.generator = generator
        self.steps = 0
        self.weights: list[Any] = [self._nearest(p.detach()) for p in self.params]
        zeros = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.exp_avg = [quantize(z, bits=moment_bits, group_size=group_size) for z in zeros]
        self.exp_avg_sqrt = [quantize(z, bits=moment_bits, group_size=group_size) for z in zeros]
        self._load()

    def _nearest(self, w: Tensor):
        """Round-to-nearest storage of ``w`` in the weight format."""
        if self.weight_format == "nf4":
            from flux import quant_bnb

            return quant_bnb.quantize_frozen(w, "nf4", self.group_size)
        return quantize(w, bits=WEIGHT_BITS, group_size=self.group_size)

    def _stochastic(self, w: Tensor):
        """Unbiased stochastically rounded storage of ``w`` (float32) in the weight format."""
        if self.weight_format == "nf4":
            from flux import quant_bnb

            return quant_bnb.stochastic_quantize(w, "nf4", self.group_size, self.generator)
        return stochastic_quantize(w, WEIGHT_BITS, self.group_size, self.generator)

    def _master(self, i: int) -> Tensor:
        """A float32 copy of parameter ``i``'s stored weights, for the update to write into."""
        return self.weights[i].dequantize(torch.float32)

    @torch.no_grad()
    def _load(self) -> None:
        for p, q in zip(self.params, self.weights):
            p.copy_(q.dequantize(p.dtype))

    def stored_bytes(self) -> int:
        """Bytes of the quantized weights and moments (integers + scales)."""
        return sum(q.nbytes for q in (*self.weights, *self.exp_avg, *self.exp_avg_sqrt))

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        b1, b2 = ADAM_BETAS
        t = self.steps
        for i, p in enumerate(self.params):
            g = p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            w = self._master(i)
            m = self.exp_avg[i].dequantize(torch.float32).mul_(b1).add_(g, alpha=1 - b1)
            v = self.exp_avg_sqrt[i].dequantize(torch.float32).square_().mul_(b2).addcmul_(g, g, value=1 - b2)
            w.mul_(1 - self.lr * self.weight_decay)
            denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(ADAM_EPS)
            w.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** t))
            self.weights[i] = self._stochastic(w)
            self.exp_avg[i] = quantize(m, bits=self.moment_bits, group_size=self.group_size)
            self.exp_avg_sqrt[i] = quantize(v.sqrt_(), bits=self.moment_bits, group_size=self.group_size)
            if p.grad is not None:
                p.grad.zero_()
        self._load()


@dataclasses.dataclass(frozen=True)
class QuantizedLayout:
    """What an FMQ participant holds (bytes).

    Attributes:
        memory_bytes: the device memory it was sized for.
        moment_bits: precision of the stored AdamW moments.
        fixed_bytes: non-expert weights + their training state + routing counts.
        expert_weight_bytes: int4 (or NF4) expert stacks (+ float biases where the experts have them).
        moment_bytes: quantized moments of the expert stacks (+ float bias training state).
        working_bytes: one expert's float W, G, m, v (the largest layer's expert).
    """

    memory_bytes: int
    moment_bits: int
    fixed_bytes: int
    expert_weight_bytes: int
    moment_bytes: int
    working_bytes: int
    weight_format: str = "int4"

    @property
    def total(self) -> int:
        return self.fixed_bytes + self.expert_weight_bytes + self.moment_bytes + self.working_bytes


def quantized_layout(handle, memory_bytes: int, dense: list[nn.Parameter],
                     moment_bits: Optional[int] = None, weight_format: str = "int4") -> QuantizedLayout:
    """The FMQ memory layout for ``memory_bytes``: 8-bit moments if they fit, else 4-bit.

    Args:
        dense: the non-expert parameters that train.
        moment_bits: force 8 or 4 (still checked against the memory).
        weight_format: ``"int4"`` or ``"nf4"`` (:class:`QuantizedAdamW`): NF4 stacks hold a 16-entry
            fp32 code book each on top of int4's bytes.

    Raises:
        ValueError: negative memory, or not even 4-bit moments fit (the message names the bytes).
    """
    from flux.moe import LayerLayout, estimate_memory

    if memory_bytes < 0:
        raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    # the weight stacks as the memory model's frozen-stack formats (flux int4, or NF4 at block GROUP_SIZE)
    weight_quantization = "nf4" if weight_format == "nf4" else WEIGHT_BITS
    choices = MOMENT_BITS_CHOICES if moment_bits is None else (moment_bits,)
    float_report = estimate_memory(handle, None, optimizer="adamw", train_experts=False, trainable=dense)
    fixed = float_report.total - float_report.details["expert_weights"]
    # one expert at a time: its dequantized W, its gradient and the float m, v of its update
    working = max(4 * row["weights"] // layer.num_experts
                  for row, layer in zip(float_report.details["per_layer"], handle.moe_layers))
    layouts = []
    for bits in choices:
        weights = moments = 0
        for l, layer in enumerate(handle.moe_layers):
            e = layer.num_experts
            el = layer.source.dtype.itemsize
            bias = e * (2 * layer.intermediate_size + layer.hidden_size) * el if layer.source.has_bias else 0
            index = 4 * e  # the view's group index; not part of a weight stack

            def stack_bytes(b: int | str) -> int:  # quantized gate_up + down (+ float biases)
                lay = LayerLayout(tuned=0, merged_groups=e, quantize_bits=b, quantize_group_size=GROUP_SIZE,
                                  keep_originals=False)
                rep = estimate_memory(handle, {l: lay}, optimizer="adamw", train_experts=False)
                return rep.details["per_layer"][l]["weights"] - index

            weights += stack_bytes(weight_quantization)
            moments += 2 * (stack_bytes(bits) - bias) + 3 * bias  # biases train in float AdamW
        layouts.append(QuantizedLayout(memory_bytes, bits, fixed, weights, moments, working, weight_format))
        if layouts[-1].total <= memory_bytes:
            return layouts[-1]
    raise ValueError(f"memory_bytes={memory_bytes}: FMQ needs at least {layouts[-1].total} bytes "
                     f"({layouts[-1].moment_bits}-bit moments: {layouts[-1]})")


def weight_format_of(cfg: Any) -> str:
    """``cfg.fmq.weight_format``; "int4" for a config without an ``[fmq]`` table (hand-built
    contexts)."""
    return getattr(getattr(cfg, "fmq", None), "weight_format", "int4")


class FMQ(Method):
    """Every participant trains every expert through int4 weights (module docstring)."""

    name = "fmq"
    own_config_keys = ("fmq.weight_format",)

    def __init__(self) -> None:
        self.layouts: dict[int, QuantizedLayout] = {}
        self.last_optimizer: Optional[QuantizedAdamW] = None  # for inspection (tests, debugging)

    def setup(self, ctx: RunContext) -> None:
        dense = list(self.dense_parameters(ctx).values())
        fmt = weight_format_of(ctx.cfg)
        self.layouts = per_device_memory(ctx, lambda memory: quantized_layout(ctx.work.handle, memory, dense,
                                                                               weight_format=fmt))

    def layout_for(self, ctx: RunContext, pid: int) -> QuantizedLayout:
        if not self.layouts:
            self.setup(ctx)
        return self.layouts[pid]

    def local_update(self, ctx: RunContext, round_idx: int, pid: int, plan: Any, profile: Any) -> Update:
        from flux.merging.install import drop_model

        cfg, handle = ctx.cfg, ctx.work.handle
        layers = handle.moe_layers
        layout = self.layout_for(ctx, pid)
        with self.session(ctx, round_idx, pid) as s:
            with s.overhead():
                # every expert its own trainable group: the view's stacks are the dequantized working copy
                drop_model(handle, [list(range(layer.num_experts)) for layer in layers], trainable=True)
                stacks = [p for layer in layers for p in (layer.view.tuned_gate_up, layer.view.tuned_down)]
                biases = [p for layer in layers for p in (layer.view.tuned_gate_up_bias, layer.view.tuned_down_bias)
                          if p is not None]
                s.begin(views=False, extra={**{f"__bias{i}": p for i, p in enumerate(biases)},
                                            **{f"__stack{i}": p for i, p in enumerate(stacks)}})
                opt = QuantizedAdamW(stacks, lr=round_lr(cfg, round_idx), moment_bits=layout.moment_bits,
                                     generator=participant_generator(cfg.seed, round_idx, pid, ROUNDING_STREAM),
                                     weight_format=layout.weight_format)
                self.last_optimizer = opt
            # the quantized update runs right after the backward, before the float optimizer step
            stats = s.train([*s.dense.values(), *biases], on_micro_batch=lambda mb, n, j: opt.step())
            with s.overhead():
                deltas, tokens = s.view_deltas(routed_only=True)
                dense_deltas = s.dense_deltas()
            return s.upload(stats, deltas, tokens, dense_deltas=dense_deltas, peak_memory_bytes=layout.total,
                            moment_bits=layout.moment_bits)
