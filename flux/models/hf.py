"""A user's own transformers MoE checkpoint (``model.path``): load it for fine-tuning.

Any directory ``save_pretrained`` wrote for a ``*ForCausalLM`` whose MoE layers ``flux.patch``
supports (the transformers 5.x families; remote-code families with ``nn.ModuleList`` experts
with ``trust_remote_code = true``).  The model is loaded with eager attention (profiling reads
the attention probabilities) and the KV cache off for the run; :func:`saved_config` puts the
checkpoint's own settings back when the fine-tuned model is saved (``flux.models.export``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

DTYPES = ("float32", "bfloat16", "float16", "auto")  # model.dtype; "auto" = the checkpoint's own


@dataclasses.dataclass
class CheckpointSource:
    """Where a run's model came from (kept on the workload for the end-of-run save).

    Attributes:
        path: the checkpoint directory.
        dtype: the dtype it was loaded in (``torch.dtype``).
        use_cache: the checkpoint config's ``use_cache`` (the run turns the cache off).
        trust_remote_code: as configured.
        model_type: ``config.model_type``.
    """

    path: str
    dtype: object
    use_cache: Optional[bool]
    trust_remote_code: bool
    model_type: str


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def check_checkpoint_dir(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Path:
    """``path`` as a checkpoint directory, or a ValueError that says what is missing (or that its
    model code ships with it and ``trust_remote_code`` is off)."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{p} is not a directory (model.path must be a save_pretrained checkpoint directory)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{p} has no config.json: not a save_pretrained checkpoint directory")
    weights = [f for f in os.listdir(p) if f.endswith((".safetensors", ".bin")) or f.endswith(".index.json")]
    if not weights:
        raise ValueError(f"{p} has no weights (*.safetensors or *.bin): save the model with save_pretrained")
    try:
        with open(p / "config.json", encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}/config.json is not readable JSON ({exc})") from None
    if raw.get("auto_map") and not trust_remote_code:
        raise ValueError(f"{p}: the checkpoint's model code ships with it (config.json auto_map); loading it runs "
                         "that code: set model.trust_remote_code = true if you trust it")
    return p


def load_lm(path: str | os.PathLike, *, dtype: str = "float32", trust_remote_code: bool = False,
            progress: bool = False):
    """``(lm, source)``: the checkpoint's ``*ForCausalLM`` (train mode, eager attention, no KV
    cache) and its :class:`CheckpointSource`.

    Raises ValueError for a directory that is not a causal-LM checkpoint, with the reason.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    p = check_checkpoint_dir(path, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{p}: transformers cannot read this config ({exc})") from exc
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype(dtype), attn_implementation="eager",
                                                  trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ValueError(f"{p}: not a causal-LM checkpoint AutoModelForCausalLM can load "
                         f"(model_type {config.model_type!r}): {exc}") from exc
    finally:
        if not progress:
            transformers.utils.logging.enable_progress_bar()
    source = CheckpointSource(path=str(p), dtype=next(lm.parameters()).dtype,
                              use_cache=getattr(lm.config, "use_cache", None), trust_remote_code=trust_remote_code,
                              model_type=str(getattr(lm.config, "model_type", "")))
    if hasattr(lm.config, "use_cache"):
        lm.config.use_cache = False  # nothing in a run generates; profiling calls the backbone without use_cache
    lm.train()
    return lm, source
