"""Small MoE model presets built from transformers configs (no pretrained MoE can be downloaded).

Each preset is a transformers config dict (``model_type`` + fields).  Sizes are chosen so one
forward+backward of a ``[16, 64]`` token batch takes about 0.15 s on one CPU thread:

* ``mixtral-tiny``: Mixtral-like coarse experts, 8 experts top-2 in each of 4 layers.
* ``deepseek-tiny``: DeepSeek-MoE-like fine-grained experts (transformers ``deepseek_v3``):
  16 small routed experts top-4 plus one shared expert, first layer dense, small MLA attention.
* ``*-small``: the same shapes at twice the width (hidden and expert sizes).
* ``mixtral-base`` (12.3 M parameters: 4 layers x 8 experts of 384, top-2, hidden 256) and
  ``deepseek-base`` (12.1 M: 1 dense + 4 MoE layers x 32 fine-grained experts of 128, top-4, + 1
  shared expert, hidden 192): the presets of the realistic regime, pretrained on the whole
  offline corpus before federated fine-tuning.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

_MIXTRAL_TINY: dict[str, Any] = {
    "model_type": "mixtral",
    "hidden_size": 128,
    "intermediate_size": 256,  # per expert
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.01,  # used by pretraining (load balance), not by classification
}

_DEEPSEEK_TINY: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "hidden_size": 128,
    "intermediate_size": 512,  # the dense first layer
    "moe_intermediate_size": 64,  # per routed / shared expert: fine-grained
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,  # the 671B model's 2.5 would only rescale a tiny model's MoE output
    "q_lora_rank": None,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 32,
}


# The realistic-regime presets (10-40 M parameters with a 4,096-token vocabulary): pretrained on
# the whole offline corpus (flux.data.corpus) until their experts specialise (docs/models.md).
_MIXTRAL_BASE: dict[str, Any] = {
    **_MIXTRAL_TINY,
    "hidden_size": 256,
    "intermediate_size": 384,  # per expert
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

_DEEPSEEK_BASE: dict[str, Any] = {
    **_DEEPSEEK_TINY,
    "hidden_size": 192,
    "intermediate_size": 768,  # the dense first layer
    "moe_intermediate_size": 128,  # fine-grained: 32 small routed experts, top-4, + 1 shared
    "num_hidden_layers": 5,
    "n_routed_experts": 32,
    "num_experts_per_tok": 4,
}


def _doubled(preset: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    wider = dict(preset)
    for key in keys:
        wider[key] = 2 * preset[key]
    return wider


PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-tiny": _MIXTRAL_TINY,
    "mixtral-small": _doubled(_MIXTRAL_TINY, ("hidden_size", "intermediate_size")),
    "mixtral-base": _MIXTRAL_BASE,
    "deepseek-tiny": _DEEPSEEK_TINY,
    "deepseek-base": _DEEPSEEK_BASE,
    "deepseek-small": _doubled(_DEEPSEEK_TINY, ("hidden_size", "intermediate_size", "moe_intermediate_size")),
}


def resolve_spec(model: str | Mapping[str, Any]) -> dict[str, Any]:
    """The transformers config dict for a preset name, ``{"preset": name, **overrides}`` or a full
    config dict with ``model_type`` (returned as a copy)."""
    if isinstance(model, str):
        return _preset(model)
    if not isinstance(model, Mapping):
        raise ValueError(f"model must be a preset name or a mapping, got {type(model).__name__}")
    spec = dict(model)
    if "preset" in spec:
        base = _preset(spec.pop("preset"))
        base.update(spec)
        return base
    if "model_type" not in spec:
        raise ValueError(
            f"model mapping needs a 'preset' ({', '.join(sorted(PRESETS))}) or a 'model_type'; got keys {sorted(spec)}")
    return copy.deepcopy(spec)


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def build_config(model: str | Mapping[str, Any], vocab_size: int, *, max_positions: int = 512):
    """A transformers ``PretrainedConfig`` for ``model`` (see :func:`resolve_spec`).

    ``vocab_size`` comes from the tokenizer; ``max_positions`` sets ``max_position_embeddings``
    unless the spec sets it.  Attention is always eager (so ``output_attentions=True`` returns the
    attention probabilities profiling needs) and the KV cache is off (nothing here generates).
    """
    from transformers import AutoConfig

    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if max_positions <= 0:
        raise ValueError(f"max_positions must be positive, got {max_positions}")
    spec = resolve_spec(model)
    model_type = spec.pop("model_type")
    spec.setdefault("max_position_embeddings", max_positions)
    spec["vocab_size"] = vocab_size
    spec.setdefault("use_cache", False)
    try:
        config = AutoConfig.for_model(model_type, **spec)
    except ValueError as exc:
        raise ValueError(f"model_type {model_type!r} is not a transformers config: {exc}") from exc
    config._attn_implementation = "eager"
    return config


def build_lm(config, seed: int = 0):
    """The ``*ForCausalLM`` model of ``config``, initialised from ``seed`` (same seed -> identical
    weights).  The global RNG state is left as it was."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return lm
