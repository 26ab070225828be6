"""One participant's local training loop, shared by every method.

The loop is plain: ``steps`` mini-batches drawn from the participant's data with a generator
seeded by (run seed, round, participant) — so a participant trains the same way on any rank and
after a resume — AdamW on the given parameters, cross-entropy on the classifier logits.  A
mini-batch can be split into micro-batches (gradients accumulate to the same batch gradient);
methods that need per-sample-like gradient statistics (FLUX's Eq. 3 utility) hook in after each
micro-batch backward.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MicroBatchHook = Callable[[dict, int, int], None]
StepHook = Callable[[dict], None]


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


def participant_generator(seed: int, round_idx: int, pid: int, stream: int = 0) -> torch.Generator:
    """A CPU generator unique to (seed, round, participant, stream); independent of rank layout."""
    # Large odd multipliers keep the streams of neighbouring (round, pid) pairs apart.
    key = (seed * 1_000_003 + round_idx * 7_919 + pid * 104_729 + stream * 15_485_863) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


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


def classification_loss(model: nn.Module, batch: dict, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``model(input_ids, attention_mask)`` against ``batch["labels"]``.

    Args:
        batch: ``input_ids`` int64 [B, S], ``attention_mask`` int64 [B, S], ``labels`` int64 [B].
    """
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits.float(), batch["labels"], reduction=reduction)


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
    on_micro_batch: Optional[MicroBatchHook] = None,
    on_step: Optional[StepHook] = None,
    weight_decay: float = 0.0,
) -> LocalStats:
    """Train ``params`` of ``model`` for ``steps`` mini-batches of ``data``.

    Args:
        params: the parameters to update (everything else should have ``requires_grad=False``).
        micro_batches: split each mini-batch in this many chunks; the summed micro-batch losses
            (each ``sum / B``) give exactly the mini-batch gradient.
        on_micro_batch: called as ``hook(micro_batch, batch_size, j)`` after the backward of the
            step's j-th micro-batch (the ``.grad`` fields then hold the step's running sum).
        on_step: called as ``hook(batch)`` after each optimizer step (forward-only updates of
            parameters the optimizer does not own, e.g. zeroth-order exploration experts).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None
    stream = batch_stream(data, batch_size, generator)
    losses: list[float] = []
    seen: list[int] = []
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        for _ in range(steps):
            batch = next(stream)
            n = batch["labels"].shape[0]
            seen.extend(batch["index"].tolist())
            if opt is not None:
                opt.zero_grad(set_to_none=False)
            total = 0.0
            for j, sl in enumerate(_slices(n, micro_batches)):
                mb = {k: v[sl] for k, v in batch.items()}
                loss = classification_loss(model, mb, reduction="sum") / n
                if opt is not None:
                    loss.backward()
                total += float(loss.detach())
                if on_micro_batch is not None:
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
