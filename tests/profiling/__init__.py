"""Shared builders for the flux.profiling tests: tiny Mixtral / DeepSeek-V3 models and batches."""
from __future__ import annotations

import torch
from torch import Tensor, nn

VOCAB = 256


def tiny_mixtral(seed: int = 0, layers: int = 2) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    cfg._attn_implementation = "eager"
    return MixtralForCausalLM(cfg).eval()


def tiny_deepseek_v3(seed: int = 0) -> nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
                           num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                           topk_group=1, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
                           qk_nope_head_dim=16, v_head_dim=32)
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # DeepSeek-V3 zero-initialises its routers; give them something to route with
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.2)
    return model


MODELS = {"mixtral": tiny_mixtral, "deepseek_v3": tiny_deepseek_v3}


def make_batches(num: int = 3, batch: int = 6, seq: int = 12, seed: int = 0, pad: bool = True) -> list[dict]:
    """Right-padded batches; sample indices are consecutive from 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        lengths = torch.randint(2, seq + 1, (batch,), generator=g) if pad else torch.full((batch,), seq)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask, "index": torch.arange(i * batch, (i + 1) * batch)})
    return out


def routers(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "weight")]


def router_counts(model: nn.Module, batches: list[dict]) -> list[Tensor]:
    """Histogram of the routers' own top-k ids over the non-padding tokens (a plain forward)."""
    gates = routers(model)
    counts = [torch.zeros(g.weight.shape[0], dtype=torch.int64) for g in gates]
    current: dict = {}

    def hook(l):
        def fn(module, args, output):
            ids = output[-1].reshape(current["valid"].numel(), -1)[current["valid"]]
            counts[l] += torch.bincount(ids.reshape(-1), minlength=counts[l].shape[0])
        return fn

    hooks = [g.register_forward_hook(hook(l)) for l, g in enumerate(gates)]
    try:
        with torch.no_grad():
            for b in batches:
                current["valid"] = b["attention_mask"].reshape(-1).bool()
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    return counts
