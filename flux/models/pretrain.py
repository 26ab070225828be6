"""Warm start: a short causal-LM pretraining of a freshly built MoE model on local text, cached.

No pretrained MoE can be downloaded, and a randomly initialised router sends tokens to experts
with no relation to their content; a few hundred LM steps on local text (pydoc, chatterbot) give
the federated phase experts that differ, which is what profiling, merging and role assignment
work with.  The result is cached on disk keyed by everything that determines it, so every rank
and every later run loads the same weights instead of training again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

DEFAULT_STEPS = 300  # ~60 s for mixtral-tiny on 2 CPU threads (docs/models.md)
_RECIPE_VERSION = "causal-lm-adamw-cosine-v1"  # bump when the training recipe changes
_META = "meta.json"


def pretrain_lm(lm: nn.Module, blocks: Tensor, *, steps: int, batch_size: int = 16, lr: float = 3e-3,
                seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train ``lm`` (a ``*ForCausalLM``) in place on token ``blocks`` (int64 ``[N, S]``).

    AdamW (weight decay 0.01), linear warmup over the first 10% of steps, cosine decay to 10% of
    ``lr``, gradient clipping at 1.0.  Batches are drawn epoch by epoch from a permutation seeded
    by ``seed``.  Models with a router load-balancing loss (``router_aux_loss_coef``, Mixtral) train
    with it, so routing does not collapse onto a few experts.  With ``progress`` a line goes to
    stderr about every 10% of steps.  The model is left in eval mode.

    Returns ``{"losses": [LM loss per step], "seconds": wall time}``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if blocks.dim() != 2 or blocks.dtype != torch.long or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty int64 [N, S] tensor, got {blocks.dtype} {tuple(blocks.shape)}")
    device = next(lm.parameters()).device
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, round(0.1 * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    aux_coef = float(getattr(lm.config, "router_aux_loss_coef", 0.0) or 0.0)
    extra = {"output_router_logits": True} if aux_coef > 0 else {}
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(blocks.shape[0], generator=generator)
    cursor = 0
    report_every = max(1, steps // 10)
    losses: list[float] = []
    lm.train()
    start = time.perf_counter()
    for step in range(steps):
        if cursor + batch_size > order.numel():  # next epoch
            order, cursor = torch.randperm(blocks.shape[0], generator=generator), 0
        batch = blocks[order[cursor:cursor + batch_size]].to(device)
        cursor += batch_size
        out = lm(input_ids=batch, labels=batch, use_cache=False, **extra)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        lm_loss = out.loss.detach()
        if extra and out.aux_loss is not None:
            lm_loss = lm_loss - aux_coef * out.aux_loss.detach()
        losses.append(lm_loss.item())
        if progress and ((step + 1) % report_every == 0 or step + 1 == steps):
            print(f"pretrain step {step + 1}/{steps}  loss {losses[-1]:.3f}  "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    lm.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start}


def pretrain_key(config, tokenizer, texts: Sequence[str], **settings: Any) -> tuple[str, dict[str, Any]]:
    """The cache key (hex SHA-256) and the fields it hashes: resolved config, tokenizer and corpus
    hashes, training ``settings``, torch/transformers versions and the recipe version."""
    import transformers

    from flux.data.tokenizer import corpus_hash

    fields = {
        "config": json.loads(config.to_json_string(use_diff=False)),
        "tokenizer": hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest(),
        "corpus": corpus_hash(list(texts)),
        "settings": dict(sorted(settings.items())),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "recipe": _RECIPE_VERSION,
    }
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), fields


def pretrained_lm(
    model: str | Mapping[str, Any],
    tokenizer,
    texts: Sequence[str],
    *,
    steps: int = DEFAULT_STEPS,
    seq_len: int = 64,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """A warm-started ``*ForCausalLM`` for ``model`` (preset name / spec, see ``build_config``),
    pretrained on ``texts`` with ``tokenizer`` (a ``FluxTokenizer``), from the cache when possible.

    The cache entry ``<cache_dir>/<name>-<key>`` (default ``<FLUX_CACHE>/pretrain``) holds
    ``save_pretrained`` output (safetensors) and ``meta.json``; it appears atomically and is built
    under a file lock, so concurrent callers train once and a killed run leaves only a temporary
    folder, which is ignored.  A hit returns bit-identical weights.

    Returns ``(lm, info)`` with info keys ``cache_hit``, ``path``, ``final_loss``, ``seconds``
    (training time, also on a hit), ``losses``, ``key``.  The model is in eval mode.
    """
    from flux.data.cache import atomic_dir, atomic_write_text, file_lock
    from flux.data.cache import cache_dir as default_cache_dir
    from flux.data.encode import lm_blocks
    from flux.models.presets import build_config, build_lm

    texts = list(texts)
    config = build_config(model, tokenizer.vocab_size, max_positions=max(512, seq_len))
    key, fields = pretrain_key(config, tokenizer, texts, steps=steps, seq_len=seq_len, batch_size=batch_size,
                               lr=lr, seed=seed)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir("pretrain")
    name = f"{_entry_name(model, config)}-{key[:20]}"
    path = folder / name
    with file_lock(folder / f"{name}.lock"), _hf_progress_bars(progress):
        if (path / _META).is_file():
            return _load(path, config)
        lm = build_lm(config, seed=seed)
        result = pretrain_lm(lm, lm_blocks(tokenizer, texts, seq_len=seq_len), steps=steps, batch_size=batch_size,
                             lr=lr, seed=seed, progress=progress)
        meta = {"key": key, "fields": fields, "losses": result["losses"], "seconds": result["seconds"],
                "final_loss": _final_loss(result["losses"])}
        with atomic_dir(path) as tmp:
            lm.save_pretrained(tmp)
            atomic_write_text(tmp / _META, json.dumps(meta, indent=1, default=str))  # last: marks it complete
    return lm, _info(meta, path, cache_hit=False)


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' save/load progress bars on or off for the block, restored afterwards."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _entry_name(model: str | Mapping[str, Any], config) -> str:
    if isinstance(model, str):
        return model
    return str(model.get("preset") or config.model_type)


def _final_loss(losses: list[float]) -> float | None:
    """Mean of the last 10 steps' losses (one step is noisy), None without steps."""
    tail = losses[-10:]
    return sum(tail) / len(tail) if tail else None


def _info(meta: dict[str, Any], path: Path, *, cache_hit: bool) -> dict[str, Any]:
    return {"cache_hit": cache_hit, "path": str(path), "final_loss": meta["final_loss"], "seconds": meta["seconds"],
            "losses": list(meta["losses"]), "key": meta["key"]}


def _load(path: Path, config):
    from transformers import AutoModelForCausalLM

    meta = json.loads((path / _META).read_text())
    lm = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    lm.config.use_cache = config.use_cache
    lm.eval()
    return lm, _info(meta, path, cache_hit=True)


@torch.no_grad()
def routing_frequencies(lm: nn.Module, blocks: Tensor, *, batch_size: int = 64) -> list[Tensor]:
    """Per MoE layer, the share of routing slots each expert received over ``blocks`` (int64
    ``[N, S]``): a list of float64 ``[E]`` summing to 1, counted with ``flux.patch``.  The model is
    patched only for the measurement and restored afterwards."""
    import flux

    handle = flux.patch(lm)
    try:
        for layer in handle.moe_layers:
            layer.reset_counts()
        device = next(lm.parameters()).device
        was_training = lm.training
        lm.eval()
        for start in range(0, blocks.shape[0], batch_size):
            lm.model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
        lm.train(was_training)
        counts = [layer.counts.double().cpu() for layer in handle.moe_layers]
    finally:
        handle.restore()
    return [c / c.sum().clamp_min(1) for c in counts]


def routing_summary(freqs: Sequence[Tensor]) -> list[dict[str, float]]:
    """Per layer: ``max_share`` (uniform = 1/E), ``variance`` of the shares (the paper's var_l),
    ``entropy`` normalised to [0, 1] (1 = uniform), for frequencies from :func:`routing_frequencies`."""
    rows = []
    for f in freqs:
        e = f.numel()
        entropy = -(f[f > 0] * f[f > 0].log()).sum().item() / math.log(e) if e > 1 else 0.0
        rows.append({"experts": e, "max_share": f.max().item(), "variance": f.var(unbiased=False).item(),
                     "entropy": entropy})
    return rows


def js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between two expert-share vectors ``[E]``:
    how differently two text sources are routed."""
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> float:
        keep = a > 0
        return (a[keep] * (a[keep] / m[keep]).log()).sum().item()

    return 0.5 * kl(p) + 0.5 * kl(q)
