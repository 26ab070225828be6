"""The local training loop: micro-batch splitting limited to the measured steps (FLUX's
``flux.utility_steps``), the task-loss protocol, and the server's learning-rate schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flux.federation.config import load_config
from flux.federation.local import round_lr, train_local


class _Data:
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, batch_size, *, shuffle, generator=None):
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for s in range(0, len(self), batch_size):
            i = order[s:s + batch_size]
            yield {"input_ids": self.x[i], "target": self.y[i], "index": i}


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(3, 1, bias=False)
        nn.init.zeros_(self.w.weight)

    def loss(self, batch, reduction="mean"):
        err = (self.w(batch["input_ids"]).squeeze(-1) - batch["target"]) ** 2
        return err.sum() if reduction == "sum" else err.mean()


def _train(**kw):
    model = _Linear()
    calls = []
    stats = train_local(model, _Data(32), list(model.parameters()), steps=5, batch_size=8, lr=0.05,
                        generator=torch.Generator().manual_seed(1), on_micro_batch=lambda mb, n, j: calls.append(j), **kw)
    return model.w.weight.detach().clone(), calls, stats


def test_micro_batch_steps_limit_the_measured_steps_not_the_result():
    w_all, calls_all, _ = _train(micro_batches=4)
    w_two, calls_two, _ = _train(micro_batches=4, micro_batch_steps=2)
    w_one, calls_none, stats = _train()
    assert calls_all == [0, 1, 2, 3] * 5
    assert calls_two == [0, 1, 2, 3] * 2  # later steps run whole mini-batches, no hook
    assert calls_none == [0] * 5
    # splitting only regroups the same summed gradient
    assert torch.allclose(w_all, w_one, atol=1e-6) and torch.allclose(w_two, w_one, atol=1e-6)
    assert len(stats.losses) == 5 and len(stats.samples) == 40


def test_round_lr_schedules():
    const = load_config(None, ["rounds=5", "lr=1e-3"])
    assert [round_lr(const, r) for r in range(5)] == [1e-3] * 5
    cos = load_config(None, ["rounds=5", "lr=1e-3", "lr_schedule=cosine"])
    lrs = [round_lr(cos, r) for r in range(5)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[2] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_dense_params_train_at_their_own_rate():
    """A parameter named in dense_params moves by dense_lr's steps (Adam: about lr per step)."""
    slow, fast = _Linear(), _Linear()
    both = nn.ModuleDict({"slow": slow, "fast": fast})

    class _Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = both

        def loss(self, batch, reduction="mean"):
            return self.m["slow"].loss(batch, reduction) + self.m["fast"].loss(batch, reduction)

    model = _Two()
    train_local(model, _Data(32), list(model.parameters()), steps=3, batch_size=8, lr=1e-2,
                generator=torch.Generator().manual_seed(1), dense_params=list(fast.parameters()), dense_lr=1e-1)
    moved_slow = slow.w.weight.abs().max().item()
    moved_fast = fast.w.weight.abs().max().item()
    assert moved_slow == pytest.approx(3e-2, rel=0.05) and moved_fast == pytest.approx(3e-1, rel=0.05)
