"""What a participant downloads at the start of a round, per global tensor and precision.

A participant keeps its copy of the global model between rounds and fetches only the tensors
aggregation changed since it last held them.  With ``download_bits`` = N > 0, the experts it only
*reads* this round (a FLUX participant's non-tuning experts, which it merges and profiles; an FMES
participant's dropped experts, which it only profiles) come as int-N copies
(:func:`flux.ops.quantize`, the quantizer profiling uses, so the profile is the same); the experts
it trains, the dense trainables and every non-expert weight come in full precision.  A copy is
current when the tensor did not change since it was fetched; a full-precision copy also serves as
a read-only one, a quantized one never serves as a trained one.

Keys are ``(layer, expert)`` for experts and parameter names (str) for dense trainables, as the
engine's ``changed`` history records them.
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor

#: Columns per scale of the int-N copies: ``flux.profiling.profile_model``'s default, so a
#: participant profiles its copy exactly as the engine profiles the global model.
GROUP_SIZE = 64

# key -> (the round it was fetched in, whether in full precision)
Holding = dict


def readonly_copy(weight: Tensor, bits: int) -> Tensor:
    """The participant's copy of a read-only expert weight: ``weight`` (float [..., K]) through
    the int-``bits`` download and back, same shape and dtype (``bits`` = 0: ``weight`` itself)."""
    from flux.ops import quantize

    if not bits:
        return weight
    return quantize(weight.float(), bits, GROUP_SIZE).dequantize().to(weight.dtype)


def last_changes(changed: Mapping[int, set], before_round: int) -> dict:
    """Per key, the last round < ``before_round`` whose aggregation changed it."""
    out: dict = {}
    for r in sorted(changed):
        if r < before_round:
            for key in changed[r]:
                out[key] = r
    return out


def needed(holding: Optional[Holding], key, full: bool, last_change: Optional[int]) -> bool:
    """Whether the participant must fetch ``key`` (in full precision when ``full``)."""
    if holding is None or key not in holding:
        return True
    fetched, was_full = holding[key]
    if full and not was_full:
        return True
    return last_change is not None and last_change >= fetched


def download_bytes(holding: Optional[Holding], *, full_sizes: Mapping, quantized_sizes: Mapping,
                   trained: Optional[set], last_change: Mapping, other_bytes: int) -> int:
    """Bytes the participant fetches.

    Args:
        holding: what it holds (None: it never synced; it fetches everything, plus
            ``other_bytes`` of weights no round changes, e.g. embeddings and attention).
        full_sizes / quantized_sizes: per key, bytes in full precision / as an int-N copy
            (dense keys have no quantized size: always full precision).
        trained: the expert keys it trains this round (None: it needs everything in full precision).
        last_change: :func:`last_changes` of the run.
    """
    total = other_bytes if holding is None else 0
    for key, size in full_sizes.items():
        full = trained is None or key in trained or key not in quantized_sizes
        if needed(holding, key, full, last_change.get(key)):
            total += size if full else quantized_sizes[key]
    return int(total)


def after_download(holding: Optional[Holding], round_idx: int, *, keys, trained: Optional[set],
                   quantized_keys, last_change: Mapping) -> Holding:
    """What the participant holds after its download of round ``round_idx``."""
    new = dict(holding or {})
    for key in keys:
        full = trained is None or key in trained or key not in quantized_keys
        if needed(holding, key, full, last_change.get(key)):
            new[key] = (round_idx, full)
    return new
