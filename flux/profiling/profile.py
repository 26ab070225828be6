""":func:`profile_model`: per layer and original expert, what a participant's data does to the model.

For every MoE layer the router's input hidden states are captured (forward pre-hook on the
router) and routed again by ``flux.ops.route_profile`` with the (quantized) router weight; the
returned top-k ids give the activation counts, the samples routed to each expert and, combined
with the layer's self-attention (``output_attentions=True``, eager attention), the mean
attention score of the tokens routed there.  Padding tokens (``attention_mask == 0``) are left
out of every statistic.  docs/techniques.md ("Quantized local profiling") defines the numbers.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from flux.moe.handle import COUNTS_BUFFER, LAYER_ATTR
from flux.ops import route_profile
from flux.profiling.quantized_model import QuantizedModel, quantize_model


# ---------------------------------------------------------------------------------------- results
@dataclass
class LayerProfile:
    """One MoE layer's profile.

    Attributes:
        counts: int64 [E], token-expert activations (each token counts once per top-k slot).
        frequency: float64 [E], counts / counts.sum() (zeros when no token was seen).
        sample_tokens: int32 [N, E], tokens of sample n routed to expert e (N = num_samples, or
            the largest index seen + 1).
        attention: float64 [E], mean received attention of the (token, expert) routing events
            of each expert (0 for an expert no token reached).
        num_tokens: non-padding tokens seen.
    """

    counts: Tensor
    frequency: Tensor
    sample_tokens: Tensor
    attention: Tensor
    num_tokens: int

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    def samples(self, e: int) -> tuple[Tensor, Tensor]:
        """The samples routed to expert ``e``: (indices int64 [n], tokens int32 [n]), ascending index."""
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} is out of range [0, {self.num_experts})")
        column = self.sample_tokens[:, e]
        indices = torch.nonzero(column, as_tuple=True)[0]
        return indices, column[indices]

    def to_dict(self) -> dict:
        return {"counts": self.counts.tolist(), "frequency": self.frequency.tolist(),
                "sample_tokens": self.sample_tokens.tolist(), "attention": self.attention.tolist(),
                "num_tokens": self.num_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerProfile":
        experts = len(d["counts"])
        tokens = torch.tensor(d["sample_tokens"], dtype=torch.int32).reshape(-1, experts)
        return cls(torch.tensor(d["counts"], dtype=torch.int64), torch.tensor(d["frequency"], dtype=torch.float64),
                   tokens, torch.tensor(d["attention"], dtype=torch.float64), int(d["num_tokens"]))


@dataclass
class ModelProfile:
    """Profiles of all MoE layers (depth order), the precision they were taken at, and the time.

    ``indices`` (int64 [n], sorted, unique) are the sample indices the batches held: which rows of
    ``sample_tokens`` were profiled, including samples whose tokens were all padding.  A profile of
    a sample of the data (``flux.profile_samples``) leaves the other rows zero; None = unknown
    (take every row as profiled).
    """

    layers: list[LayerProfile]
    bits: Optional[int]
    seconds: float
    indices: Optional[Tensor] = None

    def frequencies(self) -> list[Tensor]:
        """float64 [E_l] per layer."""
        return [layer.frequency for layer in self.layers]

    def attention_scores(self) -> list[Tensor]:
        """float64 [E_l] per layer."""
        return [layer.attention for layer in self.layers]

    def relative_l1(self, reference: "ModelProfile") -> float:
        """Mean over layers of sum_e |f_e - f_ref,e| / sum_e |f_ref,e| (the ablation's profiling error)."""
        if len(reference.layers) != len(self.layers):
            raise ValueError(f"reference has {len(reference.layers)} layers, this profile {len(self.layers)}")
        if not self.layers:
            raise ValueError("relative_l1 of a profile with no layers")
        errors = []
        for l, (mine, ref) in enumerate(zip(self.frequencies(), reference.frequencies())):
            if mine.shape != ref.shape:
                raise ValueError(f"layer {l}: {mine.shape[0]} experts here, {ref.shape[0]} in the reference")
            norm = ref.abs().sum()
            if norm == 0:
                raise ValueError(f"layer {l}: the reference profile saw no tokens")
            errors.append(float((mine - ref).abs().sum() / norm))
        return sum(errors) / len(errors)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "seconds": self.seconds, "layers": [layer.to_dict() for layer in self.layers],
                "indices": None if self.indices is None else self.indices.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelProfile":
        indices = d.get("indices")  # absent in dicts written before the field existed
        return cls([LayerProfile.from_dict(x) for x in d["layers"]], d["bits"], float(d["seconds"]),
                   None if indices is None else torch.tensor(indices, dtype=torch.int64))


# ---------------------------------------------------------------------------------------- attention
def received_attention(attentions: Tensor, attention_mask: Tensor) -> Tensor:
    """Attention each token receives: a[b, j] = mean over heads h and over valid queries q >= j of
    A[b, h, q, j].

    Args:
        attentions: [B, heads, S, S] attention probabilities (query, key), any float dtype.
        attention_mask: [B, S] int/bool, 1 = real token.

    Returns:
        float64 [B, S]; 0 at padding positions.
    """
    if attentions.dim() != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attentions must be [B, heads, S, S], got {tuple(attentions.shape)}")
    seq = attentions.shape[-1]
    valid = attention_mask.to(attentions.device).bool()
    mean_heads = attentions.to(torch.float64).mean(dim=1)  # [B, q, j]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attentions.device).tril()  # q >= j
    queries = causal.unsqueeze(0) & valid.unsqueeze(2)  # [B, q, j]
    summed = (mean_heads * queries).sum(dim=1)
    received = summed / queries.sum(dim=1).clamp(min=1)
    return received * valid


# ---------------------------------------------------------------------------------------- MoE layers
@dataclass
class _MoESite:
    name: str
    router: nn.Module
    top_k: int
    layer_idx: Optional[int]  # decoder layer (index into outputs.attentions)


def _sites_from_handles(layers: list) -> list[_MoESite]:
    sites = []
    for layer in layers:
        if layer.router is None or not isinstance(getattr(layer.router, "weight", None), Tensor):
            raise ValueError(f"{layer.name}: no router module with a weight [E, H] was found; cannot profile it")
        if layer.top_k is None:
            raise ValueError(f"{layer.name}: the number of experts per token (top_k) is unknown")
        sites.append(_MoESite(layer.name, layer.router, layer.top_k, layer.layer_idx))
    return sites


def _moe_sites(model: nn.Module) -> list[_MoESite]:
    """MoE layers of ``model`` as flux.patch finds them (its handles when already patched; else
    a patch that is undone at once)."""
    handles = [m.__dict__[LAYER_ATTR] for m in model.modules() if LAYER_ATTR in m.__dict__]
    if handles:
        return _sites_from_handles(handles)
    from flux.moe import patch

    handle = patch(model)
    try:
        return _sites_from_handles(handle.moe_layers)
    finally:
        handle.restore()


def _snapshot_sites(snapshot: QuantizedModel) -> list[_MoESite]:
    """The snapshot's MoE layers, found once (finding them may patch and unpatch the skeleton,
    which touches transformers' global experts registry: StaleProfiler does it before the worker)."""
    sites = snapshot.__dict__.get("_flux_moe_sites")
    if sites is None:
        sites = snapshot.__dict__["_flux_moe_sites"] = _moe_sites(snapshot.module)
    return sites


def _scoring(router: nn.Module) -> str:
    if hasattr(router, "e_score_correction_bias") or getattr(router, "scoring_func", None) == "sigmoid":
        return "sigmoid"
    return "softmax"


def _why_route_profile_differs(router: nn.Module) -> Optional[str]:
    """None when top-k of ``x @ router.weight.T`` is the router's own choice; else the reason."""
    bias = getattr(router, "bias", None)
    if isinstance(bias, Tensor) and bias.count_nonzero():
        return "the router has a bias"
    correction = getattr(router, "e_score_correction_bias", None)
    if isinstance(correction, Tensor) and correction.count_nonzero():
        return "e_score_correction_bias is non-zero (it shifts the expert choice, not the weights)"
    groups, top_groups = getattr(router, "num_group", 1) or 1, getattr(router, "topk_group", 1) or 1
    if groups > 1 and top_groups < groups:
        return f"group-limited routing ({top_groups} of {groups} groups)"
    return None


def _router_ids(output: Any, tokens: int, top_k: int) -> Tensor:
    """The integer [T, k] expert ids among a router's outputs."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in items:
        if isinstance(item, Tensor) and not item.is_floating_point() and item.numel() == tokens * top_k:
            return item.reshape(tokens, top_k)
    raise RuntimeError(f"cannot find the [T={tokens}, k={top_k}] expert ids among the router's outputs")


class _LayerStats:
    """Running statistics of one MoE layer over the batches."""

    def __init__(self, num_experts: int, num_samples: Optional[int], device: torch.device) -> None:
        self.counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.sample_tokens = torch.zeros(num_samples or 0, num_experts, dtype=torch.int32)
        self.attention_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.num_tokens = 0

    def add(self, topk_ids: Tensor, sample_of_token: Tensor, received: Optional[Tensor]) -> None:
        """topk_ids int [Tv, k]; sample_of_token int64 [Tv]; received float64 [Tv] or None."""
        tokens, k = topk_ids.shape
        self.num_tokens += tokens
        if tokens == 0:
            return
        experts = topk_ids.reshape(-1).long().cpu()
        rows = sample_of_token.repeat_interleave(k)
        needed = int(rows.max()) + 1
        if needed > self.sample_tokens.shape[0]:
            grow = torch.zeros(needed - self.sample_tokens.shape[0], self.counts.shape[0], dtype=torch.int32)
            self.sample_tokens = torch.cat([self.sample_tokens, grow])
        self.sample_tokens.index_put_((rows, experts), torch.ones_like(rows, dtype=torch.int32), accumulate=True)
        if received is not None:
            self.attention_sum.index_add_(0, experts, received.cpu().repeat_interleave(k))

    def result(self) -> LayerProfile:
        counts = self.counts.cpu()
        total = counts.sum()
        frequency = counts.double() / total if total > 0 else torch.zeros(counts.shape, dtype=torch.float64)
        attention = torch.where(counts > 0, self.attention_sum / counts.clamp(min=1).double(),
                                torch.zeros((), dtype=torch.float64))
        return LayerProfile(counts, frequency, self.sample_tokens, attention, self.num_tokens)


class _RouterTaps:
    """Hooks on the routers: each call's valid rows are routed and the ids kept for the batch."""

    def __init__(self, sites: list[_MoESite], gates: list, stats: list[_LayerStats]) -> None:
        self.sites, self.gates, self.stats = sites, gates, stats
        self.valid: Optional[Tensor] = None  # bool [B*S] on the model's device
        self.ids: list[Optional[Tensor]] = [None] * len(sites)
        self.exact = [_why_route_profile_differs(s.router) is None for s in sites]
        self._hooks = []
        for l, site in enumerate(sites):
            if self.exact[l]:
                self._hooks.append(site.router.register_forward_pre_hook(self._pre(l), with_kwargs=True))
            else:
                warnings.warn(f"{site.name}: {_why_route_profile_differs(site.router)}; route_profile cannot "
                              "reproduce this router, so its own top-k ids are profiled", RuntimeWarning, stacklevel=4)
                self._hooks.append(site.router.register_forward_hook(self._post(l)))

    def _tokens(self, rows: int, l: int) -> Tensor:
        if self.valid is None or self.valid.numel() != rows:
            raise RuntimeError(f"{self.sites[l].name}: the router saw {rows} tokens, expected batch*seq = "
                               f"{None if self.valid is None else self.valid.numel()}")
        return self.valid

    def _pre(self, l: int):
        site = self.sites[l]

        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.reshape(-1, x.shape[-1])
            x = x[self._tokens(x.shape[0], l)]
            _, ids, _ = route_profile(x, self.gates[l], site.top_k, scoring=_scoring(site.router),
                                      counts=self.stats[l].counts)
            self.ids[l] = ids

        return hook

    def _post(self, l: int):
        site = self.sites[l]

        def hook(module, args, output):
            rows = self.valid.numel() if self.valid is not None else 0
            ids = _router_ids(output, rows, site.top_k)[self._tokens(rows, l)]
            counts = self.stats[l].counts
            counts += torch.bincount(ids.reshape(-1).long().to(counts.device), minlength=counts.shape[0])
            self.ids[l] = ids

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


# ---------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def _profiling_mode(model: nn.Module, eager: bool) -> Iterator[None]:
    """eval mode, eager attention (for attention probabilities) and the flux counts untouched;
    all restored afterwards (the model may be a live one)."""
    modes = [(m, m.training) for m in model.modules()]
    counts = [(b, b.clone()) for m in model.modules() for n, b in m._buffers.items() if n == COUNTS_BUFFER]
    configs = {}
    if eager:
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
                configs[id(cfg)] = (cfg, cfg._attn_implementation_internal)
    try:
        model.eval()
        for cfg, _ in configs.values():
            cfg._attn_implementation_internal = "eager"
        yield
    finally:
        for cfg, previous in configs.values():
            cfg._attn_implementation_internal = previous
        for m, mode in modes:
            m.training = mode
        for buf, saved in counts:
            buf.copy_(saved)


def _check_batch(batch: Any, position: int, num_samples: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(batch, dict) or "input_ids" not in batch or "index" not in batch:
        raise ValueError(f"batch {position} must be a dict with input_ids, attention_mask and index")
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
        raise ValueError(f"batch {position}: input_ids must be int64 [B, S], got {getattr(ids, 'dtype', type(ids))} "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        raise ValueError(f"batch {position}: attention_mask must have the shape of input_ids {tuple(ids.shape)}")
    index = batch["index"]
    if not isinstance(index, Tensor) or index.shape != (ids.shape[0],) or index.is_floating_point():
        raise ValueError(f"batch {position}: index must be an integer tensor [B={ids.shape[0]}], "
                         f"got {tuple(getattr(index, 'shape', ()))}")
    index = index.to(torch.int64).cpu()
    if index.numel() and (int(index.min()) < 0 or (num_samples is not None and int(index.max()) >= num_samples)):
        raise ValueError(f"batch {position}: index values must lie in [0, {num_samples}), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    return ids, mask, index


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def profile_model(
    model: nn.Module | QuantizedModel,
    batches: Iterable[dict],
    *,
    bits: Optional[int] = 4,
    group_size: int = 64,
    attention: bool = True,
    num_samples: Optional[int] = None,
) -> ModelProfile:
    """Forward-only profile of a participant's data on a (quantized) MoE model.

    Args:
        model: a transformers MoE model (CausalLM or base model, patched by ``flux.patch`` or
            not), or a :class:`QuantizedModel` (then ``bits``/``group_size`` are ignored).
        batches: dicts with ``input_ids`` int64 [B, S], ``attention_mask`` int64 [B, S]
            (1 = token, 0 = padding; all ones if absent) and ``index`` int64 [B] (the samples'
            dataset positions); other keys are ignored.
        bits: 4 or 8 profiles a quantized snapshot (:func:`quantize_model`); None profiles
            ``model`` itself in full precision (no copy; its mode and flux counts are restored).
        group_size: quantization group size.
        attention: also compute the per-expert attention scores (needs eager attention; the
            model is switched to it for the call).  False leaves ``LayerProfile.attention`` zero.
        num_samples: rows of ``sample_tokens`` (default: largest index seen + 1).

    Returns:
        A :class:`ModelProfile`, one :class:`LayerProfile` per MoE layer in depth order.
    """
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 0):
        raise ValueError(f"num_samples must be a non-negative int or None, got {num_samples!r}")
    start = time.perf_counter()
    if isinstance(model, QuantizedModel):
        snapshot = model
    elif bits is None:
        snapshot = None
    else:
        snapshot = quantize_model(model, bits, group_size=group_size)
    module = snapshot.module if snapshot is not None else model
    sites = _snapshot_sites(snapshot) if snapshot is not None else _moe_sites(model)
    device = _model_device(module)
    gates = []
    for site in sites:
        packed = snapshot.packed_weight(site.router) if snapshot is not None else None
        gates.append(packed if packed is not None else site.router.weight.detach())
    stats = [_LayerStats(g.shape[0], num_samples, device) for g in gates]
    if attention and any(s.layer_idx is None for s in sites):
        raise ValueError("attention=True needs the decoder layer of every MoE layer (a number in its module path)")

    run = snapshot if snapshot is not None else model
    taps = _RouterTaps(sites, gates, stats)
    seen: list[Tensor] = []  # the batches' sample indices: the profiled rows
    try:
        with _profiling_mode(module, eager=attention), torch.no_grad():
            for position, batch in enumerate(batches):
                ids, mask, index = _check_batch(batch, position, num_samples)
                seen.append(index)
                valid = mask.reshape(-1).to(device).bool()
                taps.valid, taps.ids = valid, [None] * len(sites)
                kwargs = {"output_attentions": True} if attention else {}
                out = run(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
                sample_of_token = index.repeat_interleave(ids.shape[1])[valid.cpu()]
                received = None
                for l, site in enumerate(sites):
                    if taps.ids[l] is None:
                        raise RuntimeError(f"{site.name}: the router did not run in the forward pass")
                    if attention:
                        attn = getattr(out, "attentions", None)
                        if attn is None or site.layer_idx >= len(attn) or attn[site.layer_idx] is None:
                            raise RuntimeError(f"{site.name}: the model returned no attention probabilities for "
                                               f"decoder layer {site.layer_idx} (eager attention is required)")
                        received = received_attention(attn[site.layer_idx], mask).reshape(-1)[valid]
                    stats[l].add(taps.ids[l], sample_of_token, received)
    finally:
        taps.remove()
    layers = [s.result() for s in stats]
    indices = torch.unique(torch.cat(seen)) if seen else torch.zeros(0, dtype=torch.int64)  # sorted
    return ModelProfile(layers, snapshot.bits if snapshot is not None else None, time.perf_counter() - start, indices)
