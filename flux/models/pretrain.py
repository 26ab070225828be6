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
_RECIPE_VERSION = "causal-lm-adamw-cosine-v2"  # v2: per-epoch seeded order  # bump when the training recipe changes
_META = "meta.json"


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The batch order of one epoch: a permutation seeded by (seed, epoch), so a resumed run
    recomputes exactly the order an uninterrupted one would use."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, round(0.1 * steps))
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))


def pretrain_lm(lm: nn.Module, blocks: Tensor, *, steps: int, batch_size: int = 16, lr: float = 3e-3,
                seed: int = 0, progress: bool = True, resume_path: str | os.PathLike | None = None,
                save_every: int = 50) -> dict[str, Any]:
    """Train ``lm`` (a ``*ForCausalLM``) in place on token ``blocks`` (int64 ``[N, S]``).

    AdamW (weight decay 0.01), linear warmup over the first 10% of steps, cosine decay to 10% of
    ``lr``, gradient clipping at 1.0.  Batches are drawn epoch by epoch from permutations seeded by
    (``seed``, epoch).  Models with a router load-balancing loss (``router_aux_loss_coef``, Mixtral)
    train with it, so routing does not collapse onto a few experts.  With ``progress`` a tqdm bar
    (loss, ETA) goes to stderr.  The model is left in eval mode.

    ``resume_path``: a file the state (weights, optimizer, step, losses) is written to atomically
    every ``save_every`` steps and read back at the start, so a killed pretraining continues where
    it stopped; in deterministic mode (one thread) the result is bit-identical to an uninterrupted
    run.  The caller deletes it once the final weights are stored.

    Returns ``{"losses": [LM loss per step], "seconds": wall time (summed over resumed parts),
    "resumed_from": step the run continued from (0 = fresh)}``.
    """
    from tqdm import tqdm

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if save_every <= 0:
        raise ValueError(f"save_every must be positive, got {save_every}")
    if blocks.dim() != 2 or blocks.dtype != torch.long or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty int64 [N, S] tensor, got {blocks.dtype} {tuple(blocks.shape)}")
    device = next(lm.parameters()).device
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    aux_coef = float(getattr(lm.config, "router_aux_loss_coef", 0.0) or 0.0)
    extra = {"output_router_logits": True} if aux_coef > 0 else {}
    n = blocks.shape[0]
    per_epoch = max(1, n // batch_size)
    losses: list[float] = []
    done, seconds = 0, 0.0
    resume = Path(resume_path) if resume_path is not None else None
    if resume is not None and resume.is_file():
        state = torch.load(resume, map_location=device, weights_only=True)
        lm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        done, losses, seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])
    resumed_from = done
    lm.train()
    start = time.perf_counter()
    bar = tqdm(total=steps, initial=done, desc="pretrain", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)
    try:
        for step in range(done, steps):
            epoch, within = divmod(step, per_epoch)  # an incomplete last batch of an epoch is skipped
            order = _epoch_order(n, seed, epoch)
            batch = blocks[order[within * batch_size:(within + 1) * batch_size]].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(step, steps)
            out = lm(input_ids=batch, labels=batch, use_cache=False, **extra)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            optimizer.step()
            lm_loss = out.loss.detach()
            if extra and out.aux_loss is not None:
                lm_loss = lm_loss - aux_coef * out.aux_loss.detach()
            losses.append(lm_loss.item())
            bar.update(1)
            bar.set_postfix_str(f"loss {losses[-1]:.3f}", refresh=False)
            if resume is not None and (step + 1) % save_every == 0 and step + 1 < steps:
                _save_resume_state(resume, lm, optimizer, step + 1, losses,
                                   seconds + time.perf_counter() - start)
    finally:
        bar.close()
    lm.eval()
    return {"losses": losses, "seconds": seconds + time.perf_counter() - start, "resumed_from": resumed_from}


def _save_resume_state(path: Path, lm: nn.Module, optimizer, step: int, losses: list[float], seconds: float) -> None:
    from flux.data.cache import atomic_write

    with atomic_write(path, "wb") as fh:
        torch.save({"model": lm.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "losses": losses, "seconds": seconds}, fh)


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
    heldout: Mapping[str, Sequence[str]] | None = None,
):
    """A warm-started ``*ForCausalLM`` for ``model`` (preset name / spec, see ``build_config``),
    pretrained on ``texts`` with ``tokenizer`` (a ``FluxTokenizer``), from the cache when possible.

    The cache entry ``<cache_dir>/<name>-<key>`` (default ``<FLUX_CACHE>/pretrain``) holds
    ``save_pretrained`` output (safetensors) and ``meta.json``; it appears atomically and is built
    under a file lock, so concurrent callers train once.  While training, the state is saved every
    50 steps to ``<name>-<key>.resume.pt`` beside it: a killed pretraining continues from there
    on the next call (and the file is removed once the entry is complete).  A hit returns
    bit-identical weights.

    ``heldout``: domain -> texts never trained on; when given, the quality report of
    :func:`lm_quality` (held-out perplexity vs a unigram model, routing entropy, domain
    specialisation) is computed once after training and stored in ``meta.json``.

    Returns ``(lm, info)`` with info keys ``cache_hit``, ``path``, ``final_loss``, ``seconds``
    (training time, also on a hit), ``losses``, ``key``, ``quality`` (None without ``heldout``).
    The model is in eval mode.
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
        blocks = lm_blocks(tokenizer, texts, seq_len=seq_len)
        resume = folder / f"{name}.resume.pt"
        if progress:
            note = " (resuming)" if resume.is_file() else ""
            print(f"pretraining {_entry_name(model, config)} once ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f} M "
                  f"parameters, {steps} steps of {batch_size}x{seq_len} tokens, {blocks.numel() / 1e6:.2f} M tokens "
                  f"of text){note}; cached in {folder}", file=sys.stderr, flush=True)
        result = pretrain_lm(lm, blocks, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                             resume_path=resume)
        quality = None
        if heldout:
            quality = lm_quality(lm, tokenizer, blocks, heldout, seq_len=seq_len)
        meta = {"key": key, "fields": fields, "losses": result["losses"], "seconds": result["seconds"],
                "final_loss": _final_loss(result["losses"]), "quality": quality,
                "parameters": sum(p.numel() for p in lm.parameters()), "tokens": int(blocks.numel())}
        with atomic_dir(path) as tmp:
            lm.save_pretrained(tmp)
            atomic_write_text(tmp / _META, json.dumps(meta, indent=1, default=str))  # last: marks it complete
        resume.unlink(missing_ok=True)
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
            "losses": list(meta["losses"]), "key": meta["key"], "quality": meta.get("quality"),
            "parameters": meta.get("parameters"), "tokens": meta.get("tokens")}


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


@torch.no_grad()
def lm_quality(lm: nn.Module, tokenizer, train_blocks: Tensor, heldout: Mapping[str, Sequence[str]], *,
               seq_len: int = 64, top_fraction: float = 0.25, batch_size: int = 32) -> dict[str, Any]:
    """How good and how specialised a pretrained MoE LM is, on text it never trained on.

    Args:
        train_blocks: int64 ``[N, S]`` the training blocks (for the unigram baseline's counts).
        heldout: domain -> held-out texts.

    Returns a dict:
        ``heldout_ppl`` / ``unigram_ppl``: perplexity of the model and of an add-one unigram model
        (token frequencies of ``train_blocks``) on the same held-out next-token targets;
        ``per_domain_ppl``: the model's perplexity per domain;
        ``routing``: per MoE layer ``{entropy (normalised, 1 = uniform), max_share}`` over all
        held-out text;
        ``top_expert_share``: per domain and layer, the share of the domain's routing slots taken
        by its own top ``top_fraction`` of experts (uniform routing gives ``top_fraction``), and
        ``top_expert_share_mean`` per domain (mean over layers): specialisation.
    """
    vocab = lm.config.vocab_size
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab).double() + 1.0
    log_unigram = (counts / counts.sum()).log()
    nll_model, nll_unigram, tokens = 0.0, 0.0, 0
    per_domain: dict[str, float] = {}
    shares: dict[str, list[Tensor]] = {}
    for domain, texts in sorted(heldout.items()):
        blocks = lm_blocks_or_none(tokenizer, texts, seq_len)
        if blocks is None:
            continue
        d_nll, d_tok = 0.0, 0
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start:start + batch_size]
            logits = lm(input_ids=batch, use_cache=False).logits.float()
            targets = batch[:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            d_nll -= float(logp.double().sum())
            nll_unigram -= float(log_unigram[targets].sum())
            d_tok += targets.numel()
        nll_model += d_nll
        tokens += d_tok
        per_domain[domain] = math.exp(d_nll / d_tok)
        shares[domain] = routing_frequencies(lm, blocks)
    if not tokens:
        raise ValueError("lm_quality: the held-out texts give no block of seq_len tokens")
    domains = sorted(shares)
    n_layers = len(shares[domains[0]])
    overall = [sum(shares[d][l] for d in domains) / len(domains) for l in range(n_layers)]
    top = {}
    for d in domains:
        per_layer = []
        for f in shares[d]:
            k = max(1, round(top_fraction * f.numel()))
            per_layer.append(float(f.topk(k).values.sum()))
        top[d] = per_layer
    return {
        "heldout_ppl": math.exp(nll_model / tokens),
        "unigram_ppl": math.exp(nll_unigram / tokens),
        "heldout_tokens": tokens,
        "per_domain_ppl": per_domain,
        "routing": [{"entropy": row["entropy"], "max_share": row["max_share"]} for row in routing_summary(overall)],
        "top_fraction": top_fraction,
        "top_expert_share": top,
        "top_expert_share_mean": {d: sum(v) / len(v) for d, v in top.items()},
    }


def lm_blocks_or_none(tokenizer, texts: Sequence[str], seq_len: int) -> Tensor | None:
    """``lm_blocks`` of ``texts``, or None when they give less than one block."""
    from flux.data.encode import lm_blocks

    try:
        return lm_blocks(tokenizer, texts, seq_len=seq_len)
    except ValueError:
        return None
