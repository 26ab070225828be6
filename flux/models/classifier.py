"""Sequence classification on top of a causal MoE language model.

Transformers' ``*ForSequenceClassification`` classifies from the last token and returns no router
logits; here the label comes from the masked mean of the backbone's last hidden states (every
token's routing matters equally), and the backbone is the same module the LM was warm-started as,
so ``flux.patch(model.lm)`` sees the experts it would see in the LM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MoEClassifier(nn.Module):
    """``head(masked_mean(lm.model(input_ids, attention_mask).last_hidden_state))``.

    Attributes: ``lm`` (the ``*ForCausalLM``; its ``lm_head`` is unused here), ``head``
    (``nn.Linear(hidden, num_labels)``, initialised from ``seed``).
    """

    def __init__(self, lm: nn.Module, num_labels: int, *, seed: int = 0) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        self.lm = lm
        hidden = lm.config.hidden_size
        param = next(lm.parameters())
        self.head = nn.Linear(hidden, num_labels, device=param.device, dtype=param.dtype)
        generator = torch.Generator().manual_seed(seed)
        std = getattr(lm.config, "initializer_range", 0.02)
        with torch.no_grad():
            weight = torch.randn(self.head.weight.shape, generator=generator) * std
            self.head.weight.copy_(weight)
            self.head.bias.zero_()

    @property
    def backbone(self) -> nn.Module:
        """The base model (``lm.model``): ``backbone(input_ids, attention_mask, output_attentions=...)``."""
        return self.lm.model

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits float32 ``[B, num_labels]`` for ``input_ids`` int64 ``[B, S]`` and
        ``attention_mask`` int64 ``[B, S]`` (1 = token, 0 = padding)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, S, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.head(pooled).float()

    def loss(self, batch: dict, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the logits against ``batch["labels"]`` (int64 ``[B]``), ``"mean"`` or
        ``"sum"`` over samples; ``input_ids``/``attention_mask`` int64 ``[B, S]``."""
        logits = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["labels"], reduction=reduction)

    def evaluate(self, encoded, batch_size: int = 64) -> dict[str, float]:
        """Accuracy and mean cross-entropy over an ``EncodedDataset`` (see :func:`evaluate`)."""
        return _evaluate_classifier(self, encoded, batch_size)


def evaluate(model: nn.Module, data, batch_size: int = 64) -> dict[str, float]:
    """``model.evaluate(data)``: the task's held-out metrics (at least ``accuracy`` and ``loss``)
    for a :class:`MoEClassifier` or a :class:`flux.models.causal.MoECausalLM`."""
    return model.evaluate(data, batch_size=batch_size)


@torch.no_grad()
def _evaluate_classifier(model: MoEClassifier, encoded, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` over an ``EncodedDataset`` (eval mode, no grad;
    the model's train/eval mode is restored afterwards)."""
    if len(encoded) == 0:
        raise ValueError("evaluate needs a non-empty dataset")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    try:
        for batch in encoded.batches(batch_size, shuffle=False, generator=None):
            labels = batch["labels"].to(device)
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == labels).sum().item()
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(encoded), "loss": loss_sum / len(encoded)}
