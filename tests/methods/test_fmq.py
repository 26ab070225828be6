"""FMQ: int4 storage between steps, stochastic rounding, memory layout, the uploaded delta."""
from __future__ import annotations

import pytest
import torch

from flux.methods import fmq as fmq_module
from flux.methods.fmq import FMQ, QuantizedAdamW, quantized_layout, stochastic_quantize
from flux.ops import QuantizedTensor, quantize
from tests.methods import EXPERTS, HIDDEN, INTER, LAYERS, global_experts, tiny_context


def test_stochastic_rounding_is_unbiased_and_on_the_grid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 128, generator=g)
    nearest = quantize(w, bits=4, group_size=64)
    draws = torch.stack([stochastic_quantize(w, 4, 64, g).dequantize(torch.float32) for _ in range(400)])
    q = stochastic_quantize(w, 4, 64, g)
    assert q.bits == 4 and torch.equal(q.scales, nearest.scales)
    step = nearest.scales.repeat_interleave(64, dim=1)
    # every draw is one of the two grid points around w
    assert ((draws - w).abs() <= step + 1e-6).all()
    assert (draws.mean(0) - w).abs().max() < 0.1 * step.max()
    # round-to-nearest would be biased for a value at 0.3 of a step
    assert (draws.mean(0) - nearest.dequantize(torch.float32)).abs().max() > 0.1 * step.max()


def _bytes_of(bits: int, rows: int, cols: int) -> int:
    qdata = rows * (cols if bits == 8 else cols // 2)
    return qdata + rows * (cols // 64) * 4


def test_layout_accounting_by_hand_and_moment_fallback():
    ctx, work = tiny_context()
    dense = list(work.model.head.parameters())
    big = quantized_layout(work.handle, 1 << 40, dense)
    assert big.moment_bits == 8
    stacks = lambda bits: LAYERS * (_bytes_of(bits, EXPERTS * 2 * INTER, HIDDEN) + _bytes_of(bits, EXPERTS * HIDDEN, INTER))
    assert big.expert_weight_bytes == stacks(4)
    assert big.moment_bytes == 2 * stacks(8)
    assert big.working_bytes == 4 * 3 * HIDDEN * INTER * 4
    four = quantized_layout(work.handle, big.total - 1, dense)
    assert four.moment_bits == 4 and four.moment_bytes == 2 * stacks(4) and four.total <= big.total - 1
    with pytest.raises(ValueError, match=str(four.total)):
        quantized_layout(work.handle, four.total - 1, dense)


def test_quantized_adamw_stores_int4_and_follows_adamw():
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(3, 8, 64, generator=g))
    opt = QuantizedAdamW([p], lr=1e-2, moment_bits=8, generator=g)
    start = p.detach().clone()
    assert torch.equal(start, opt.weights[0].dequantize(torch.float32))
    p.grad = torch.randn_like(p)
    grad = p.grad.clone()
    opt.step()
    assert isinstance(opt.weights[0], QuantizedTensor) and opt.weights[0].bits == 4
    assert opt.exp_avg[0].bits == 8 and opt.exp_avg_sqrt[0].bits == 8
    assert torch.equal(p.detach(), opt.weights[0].dequantize(torch.float32))
    assert torch.count_nonzero(p.grad) == 0
    # the first AdamW step moves each weight by -lr * sign(grad); stochastic int4 rounding blurs
    # single values but is unbiased, so the mean movement against the gradient is ~lr
    moved = (start - p.detach()) * grad.sign()
    assert 0.7e-2 < moved.mean() < 1.3e-2


def test_local_update_keeps_int4_between_steps_and_uploads_dequantized_delta(monkeypatch):
    torch.set_num_threads(1)
    steps = 3
    ctx, work = tiny_context(steps=steps)
    layout = quantized_layout(work.handle, 1 << 40, list(work.model.head.parameters()))
    ctx.devices[0].memory_bytes = layout.total  # exactly what FMQ needs
    before = global_experts(work.handle)
    checks = []
    original_step = QuantizedAdamW.step

    def checked_step(self):
        original_step(self)
        for p, q in zip(self.params, self.weights):
            checks.append(q.bits == 4 and torch.equal(p.detach(), q.dequantize(p.dtype)))

    monkeypatch.setattr(fmq_module.QuantizedAdamW, "step", checked_step)
    method = FMQ()
    method.setup(ctx)
    up = method.local_update(ctx, 0, 0, None, None)
    opt = method.last_optimizer
    assert opt.steps == steps and len(checks) == steps * 2 * LAYERS and all(checks)
    assert opt.stored_bytes() == layout.expert_weight_bytes + layout.moment_bytes
    assert up.costs.peak_memory_bytes == layout.total <= ctx.devices[0].memory_bytes
    after = global_experts(work.handle)
    for (gu0, dn0), (gu1, dn1) in zip(before, after):
        assert torch.equal(gu0, gu1) and torch.equal(dn0, dn1)
    assert len(up.expert_deltas) > 0
    for (l, e), d in up.expert_deltas.items():
        i = 2 * l
        final_gu = opt.weights[i].dequantize(torch.float32)[e]
        assert torch.allclose(d["gate_up"], final_gu - before[l][0][e], atol=1e-6)
        final_dn = opt.weights[i + 1].dequantize(torch.float32)[e]
        assert torch.allclose(d["down"], final_dn - before[l][1][e], atol=1e-6)
