"""Tiny transformers MoE models and comparison helpers for the flux.moe tests (fp32, CPU)."""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn

TOL = 1e-4  # relative, the bar of the issue


def _seeded(build, seed: int):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    return model.float().train()


def tiny_mixtral(seed: int = 0, **kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = dict(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=64, initializer_range=0.1)
    cfg.update(kw)
    return _seeded(lambda: MixtralForCausalLM(MixtralConfig(**cfg)), seed)


def tiny_qwen2_moe(seed: int = 0, **kw):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
               num_experts=6, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=64, initializer_range=0.1, norm_topk_prob=False)
    cfg.update(kw)
    return _seeded(lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**cfg)), seed)


def tiny_deepseek_v3(seed: int = 0, **kw):
    """Sigmoid router with group-limited top-k and a correction bias; layer 0 is dense."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
               num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
               qk_nope_head_dim=8, v_head_dim=8, vocab_size=64, n_shared_experts=1, initializer_range=0.1)
    cfg.update(kw)
    model = _seeded(lambda: DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)), seed)
    with torch.no_grad():
        for layer in model.model.layers[cfg["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return model


# a superset of the size arguments of the transformers MoE configs (each takes what it knows)
COMMON = dict(hidden_size=32, intermediate_size=16, moe_intermediate_size=16, num_local_experts=4, num_experts=4,
              n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_topk=2, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=64, head_dim=8, initializer_range=0.1,
              pad_token_id=0, tie_word_embeddings=False, n_group=1, topk_group=1, first_k_dense_replace=0,
              kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, shared_expert_intermediate_size=16,
              n_shared_experts=1, max_position_embeddings=128)


def _auto(model_type: str, **extra):
    def build(seed: int = 0):
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(COMMON)
        cfg.update(extra)
        return _seeded(lambda: AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)), seed)

    return build


FAMILIES = {
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
    "deepseek_v3": tiny_deepseek_v3,
    "qwen3_moe": _auto("qwen3_moe"),
    "olmoe": _auto("olmoe"),
    "granitemoe": _auto("granitemoe"),
    "phimoe": _auto("phimoe"),
    "glm4_moe": _auto("glm4_moe"),
}
# further families verified the same way (tiny configs from COMMON)
MORE_FAMILIES = {name: _auto(name) for name in (
    "afmoe", "bailing_hybrid", "cohere2_moe", "deepseek_v2", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo",
    "granitemoe_swa", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "jamba", "kolibri1", "laguna",
    "mellum", "mimo_v2_flash", "minimax", "minimax_m2", "qwen3_next", "solar_open",
)}


def input_ids(seed: int = 0, batch: int = 2, seq: int = 9, vocab: int = 64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=gen)


def rel_err(a: Tensor, b: Tensor) -> float:
    scale = a.detach().abs().max().clamp(min=1e-30)
    return float((a.detach() - b.detach()).abs().max() / scale)


def assert_close(expected: Tensor, actual: Tensor, what: str, tol: float = TOL) -> None:
    assert expected.shape == actual.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(expected, actual)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def step(model: nn.Module, ids: Tensor):
    """Forward + backward of the LM loss; returns the output."""
    out = model(ids, labels=ids, use_cache=False) if _is_hf(model) else model(ids, labels=ids)
    out.loss.backward()
    return out


def _is_hf(model) -> bool:
    return type(model).__module__.startswith("transformers.") or type(model).__module__.startswith("peft.")


def compare_models(ref: nn.Module, model: nn.Module, ids: Tensor, *, tol: float = TOL, grads: bool = True) -> None:
    """Same logits, loss and parameter gradients (by name) for ref and model."""
    zero_grads(ref)
    zero_grads(model)
    a, b = step(ref, ids), step(model, ids)
    assert_close(a.logits, b.logits, "logits", tol)
    assert_close(a.loss, b.loss, "loss", tol)
    if not grads:
        return
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if "flux_view" in name:
            continue
        q = ref_params[name]
        assert (p.grad is None) == (q.grad is None), f"{name}: grad presence differs"
        if p.grad is not None:
            assert_close(q.grad, p.grad, f"grad of {name}", tol)
            checked += 1
    assert checked > 0


@contextlib.contextmanager
def router_choices(model: nn.Module, router_names=("gate", "router")):
    """Capture the top-k indices every router returns (forward hooks): {module name: [ids...]}."""
    seen: dict[str, list[Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in router_names and not isinstance(module, nn.Linear) and "experts" not in name:
            def hook(mod, args, out, name=name):
                tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, Tensor)]
                ids = next(t for t in tensors if not t.is_floating_point())
                seen.setdefault(name, []).append(ids.detach().clone())
            hooks.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def histogram(ids_list: list[Tensor], num_experts: int) -> Tensor:
    return sum(torch.bincount(t.flatten().long(), minlength=num_experts) for t in ids_list)
