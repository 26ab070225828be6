"""One participant's local training loop, shared by every method.

The loop is plain: ``steps`` mini-batches drawn from the participant's data with a generator
seeded by (run seed, round, participant) — so a participant trains the same way on any rank and
after a resume — AdamW on the given parameters (``torch.optim.AdamW``, or bitsandbytes'
AdamW8bit with ``optimizer="adamw8bit"``), the task's loss (``model.loss``).  A
mini-batch can be split into micro-batches (gradients accumulate to the same batch gradient);
methods that need per-sample-like gradient statistics (FLUX's Eq. 3 utility) hook in after each
micro-batch backward.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

MicroBatchHook = Callable[[dict, int, int], None]
StepHook = Callable[[dict], None]
OPTIMIZERS = ("adamw", "adamw8bit")  # flux.federation.config.OPTIMIZERS (flux.optimizer)


@dataclasses.dataclass
class LocalStats:
    """What a local training run measured.

    Attributes:
        losses: mean training loss per step.
        seconds: wall time of the loop (forward + backward + optimizer), this machine.
        samples: sample positions (into the participant's data) seen, in order.
    """

    losses: list[float]
    seconds: float
    samples: list[int]


def round_lr(cfg, round_idx: int) -> float:
    """The learning rate of round ``round_idx`` (0-based): ``cfg.lr`` for ``lr_schedule =
    "constant"``; for ``"cosine"`` a cosine decay over the run's rounds from ``cfg.lr`` to 10% of
    it (the server's schedule: every participant of a round uses the same rate)."""
    if cfg.lr_schedule == "constant" or cfg.rounds <= 1:
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        frac = min(1.0, round_idx / (cfg.rounds - 1))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")


def batch_stream(data, batch_size: int, generator: torch.Generator) -> Iterator[dict]:
    """Endless shuffled mini-batches over ``data`` (an ``EncodedDataset``): epoch after epoch."""
    while True:
        yielded = False
        for batch in data.batches(batch_size, shuffle=True, generator=generator):
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("participant has no training data")


def _slices(n: int, parts: int) -> list[slice]:
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def task_loss(model: nn.Module, batch: dict, reduction: str = "mean") -> Tensor:
    """The task's training loss, ``model.loss(batch, reduction)``: cross-entropy of the labels for
    a classifier (``labels`` int64 [B]), answer-token cross-entropy for instruction tuning
    (``loss_mask`` int64 [B, S]); ``"mean"`` or ``"sum"`` over the samples of ``batch``."""
    return model.loss(batch, reduction=reduction)


def make_optimizer(name: str, groups: list[dict], *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The local optimizer ``name`` over parameter ``groups`` (``torch.optim`` param-group dicts):
    ``"adamw"`` = ``torch.optim.AdamW`` (fp32 moments like the parameters), ``"adamw8bit"`` =
    bitsandbytes' AdamW8bit (:func:`flux.quant_bnb.adamw8bit`: 8-bit moments; needs bitsandbytes)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        from flux import quant_bnb

        quant_bnb.require("flux.optimizer = 'adamw8bit'")
        return quant_bnb.adamw8bit(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def train_local(
    model: nn.Module,
    data,
    params: Sequence[nn.Parameter],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    micro_batches: int = 1,
    micro_batch_steps: Optional[int] = None,
    on_micro_batch: Optional[MicroBatchHook] = None,
    on_step: Optional[StepHook] = None,
    weight_decay: float = 0.0,
    dense_params: Sequence[nn.Parameter] = (),
    dense_lr: Optional[float] = None,
    optimizer: str = "adamw",
) -> LocalStats:
    """Train ``params`` of ``model`` for ``steps`` mini-batches of ``data``.

    Args:
        params: the parameters to update (everything else should have ``requires_grad=False``).
        micro_batches: split each mini-batch in this many chunks; the summed micro-batch losses
            (each ``sum / B``) give exactly the mini-batch gradient.
        micro_batch_steps: only the first this many steps are split (None = every step): the
            later ones run whole mini-batches, which is faster on small batches.
        on_micro_batch: called as ``hook(micro_batch, batch_size, j)`` after the backward of the
            step's j-th micro-batch (the ``.grad`` fields then hold the step's running sum).
        dense_params, dense_lr: parameters of ``params`` that train at ``dense_lr`` instead of
            ``lr`` (the run's non-expert trainables, ``dense_lr_scale``).
        on_step: called as ``hook(batch)`` after each optimizer step (forward-only updates of
            parameters the optimizer does not own, e.g. zeroth-order exploration experts).
        optimizer: ``"adamw"`` or ``"adamw8bit"`` (:func:`make_optimizer`).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if optimizer not in OPTIMIZERS:  # before any work
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    params = [p for p in params if p.requires_grad]
    opt = None
    if params:
        # the non-expert trainables (a new task head) may learn at their own rate: they do not route
        special = {id(p) for p in dense_params} if dense_lr is not None else set()
        groups = [{"params": [p for p in params if id(p) not in special], "lr": lr},
                  {"params": [p for p in params if id(p) in special], "lr": dense_lr if dense_lr is not None else lr}]
        opt = make_optimizer(optimizer, [g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
    stream = batch_stream(data, batch_size, generator)
    losses: list[float] = []
    seen: list[int] = []
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        for step in range(steps):
            batch = next(stream)
            n = batch["input_ids"].shape[0]
            seen.extend(batch["index"].tolist())
            if opt is not None:
                opt.zero_grad(set_to_none=False)
            total = 0.0
            split = micro_batches if micro_batch_steps is None or step < micro_batch_steps else 1
            for j, sl in enumerate(_slices(n, split)):
                mb = {k: v[sl] for k, v in batch.items()}
                loss = task_loss(model, mb, reduction="sum") / n
                if opt is not None:
                    loss.backward()
                total += float(loss.detach())
                if on_micro_batch is not None and split == micro_batches:
                    on_micro_batch(mb, n, j)
            if opt is not None:
                opt.step()
            if on_step is not None:
                on_step(batch)
            losses.append(total)
    finally:
        model.train(was_training)
    return LocalStats(losses=losses, seconds=time.perf_counter() - start, samples=seen)


def snapshot(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies (the global values a participant starts from)."""
    return {k: v.detach().clone() for k, v in params.items()}


def restore(params: dict[str, Tensor], saved: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])


def take_deltas(params: dict[str, Tensor], saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """``params - saved`` per name, then put ``saved`` back (a participant leaves the global
    values untouched)."""
    deltas = {k: p.detach() - saved[k] for k, p in params.items()}
    restore(params, saved)
    return deltas
