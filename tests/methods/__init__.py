"""Small hand-built pieces for the baseline tests: a tiny Mixtral classifier, a tiny encoded
dataset and a RunContext (the engine's objects, reduced to the fields the methods use)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from flux.data.encode import EncodedDataset
from torch import nn

import flux

HIDDEN, INTER, EXPERTS, LAYERS, SEQ = 64, 64, 8, 2, 12


class TinyClassifier(nn.Module):
    """``head(masked mean of lm's last hidden state)``: the MoEClassifier contract."""

    def __init__(self, lm: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0)).float()

    def loss(self, batch: dict, reduction: str = "mean") -> torch.Tensor:
        """The task-loss protocol of the engine (``flux.federation.local.task_loss``)."""
        logits = self(batch["input_ids"], batch["attention_mask"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction=reduction)


def tiny_data(n: int, vocab: int, labels: int, seed: int) -> EncodedDataset:
    """Random token sequences with random labels (the real EncodedDataset, so batching is the
    engine's own)."""
    g = torch.Generator().manual_seed(seed)
    return EncodedDataset(torch.randint(1, vocab, (n, SEQ), generator=g), torch.ones(n, SEQ, dtype=torch.int64),
                          torch.randint(0, labels, (n,), generator=g), [f"l{i}" for i in range(labels)])


def tiny_model(seed: int = 0) -> TinyClassifier:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                        num_experts_per_tok=2, initializer_range=0.1)
    cfg._attn_implementation = "eager"
    return TinyClassifier(MixtralForCausalLM(cfg), num_labels=3)


def tiny_context(memory: list[int] | None = None, *, steps: int = 2, seed: int = 0):
    """(RunContext, work) for participants with the given device memory (bytes)."""
    from flux.methods.api import RunContext

    model = tiny_model(seed)
    handle = flux.patch(model.lm)
    memory = memory or [1 << 40]
    work = SimpleNamespace(model=model, handle=handle,
                           train=[tiny_data(16, 128, 3, seed=100 + p) for p in range(len(memory))])
    cfg = SimpleNamespace(lr=1e-3, lr_schedule="constant", dense_lr_scale=1.0, rounds=1, local_steps=steps,
                          batch_size=4, seed=seed, non_expert="head", upload_bits=0,
                          flux=SimpleNamespace())
    devices = [SimpleNamespace(name=f"dev{p}", memory_bytes=m) for p, m in enumerate(memory)]
    return RunContext(cfg=cfg, work=work, devices=devices), work


def expert_bytes() -> int:
    """fp32 bytes of one expert's weights (gate_up [2I, H] + down [H, I])."""
    return 3 * HIDDEN * INTER * 4


def global_experts(handle) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Clones of every layer's (gate_up [E, 2I, H], down [E, H, I])."""
    out = []
    for layer in handle.moe_layers:
        gu, dn, _, _ = layer.source.full_stacks()
        out.append((gu.detach().clone(), dn.detach().clone()))
    return out
