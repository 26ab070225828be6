"""What a participant downloads at the start of a round, per global tensor and precision.

A participant keeps its copy of the global model between rounds and fetches only the tensors
aggregation changed since it last held them.  With ``download_bits`` = N > 0, the experts it only
*reads* this round (a FLUX participant's non-tuning experts, which it merges and profiles; an FMES
participant's dropped experts, which it only profiles) come as int-N copies
(:func:`flux.ops.quantize`, the quantizer profiling uses, so the profile is the same); the experts
it trains, the dense trainables and every non-expert weight come in full precision.  A copy is
current when the tensor did not change since it was fetched; a full-precision copy also serves as
a read-only one, a quantized one never serves as a trained one.

With ``broadcast_bits`` (flux/federation/compression.py) the server applies every round's
aggregate as an int-N delta; a participant holding a full-precision copy may then bring it up
to date from the deltas of the rounds that changed it since (``delta_sizes`` bytes each) instead
of fetching the tensor, whichever is fewer bytes, and holds a current full-precision copy after.

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


def changes_since(changed: Mapping[int, set], key, since: int, before_round: int) -> int:
    """How many rounds r with ``since <= r < before_round`` changed ``key``."""
    return sum(1 for r, keys in changed.items() if since <= r < before_round and key in keys)


def fetch(holding: Optional[Holding], key, *, full: bool, size: int, quantized_size: Optional[int],
          last_change: Optional[int], delta_size: Optional[int] = None, changed: Optional[Mapping[int, set]] = None,
          round_idx: int = 0) -> Optional[tuple[int, bool]]:
    """How the participant gets ``key`` this round: ``(bytes, holds full precision after)``, or
    None when its copy is current.

    A fresh copy costs ``size`` (full precision) or ``quantized_size``; with ``delta_size`` (the
    packed bytes of one broadcast round delta) a participant holding a full-precision copy
    fetched in round f may instead apply the deltas of the rounds f <= r < ``round_idx`` that
    changed ``key`` (:func:`changes_since` of ``changed``), when that is fewer bytes.
    """
    if not needed(holding, key, full, last_change):
        return None
    fresh = size if full else quantized_size
    if delta_size is not None and holding is not None and key in holding and holding[key][1]:
        via_deltas = changes_since(changed or {}, key, holding[key][0], round_idx) * delta_size
        if via_deltas <= fresh:
            return int(via_deltas), True
    return int(fresh), full


def round_fetches(holding: Optional[Holding], round_idx: int, *, sizes: Mapping, trained: Optional[set],
                  quantized_sizes: Mapping, last_change: Mapping, delta_sizes: Optional[Mapping],
                  changed: Optional[Mapping[int, set]]) -> dict:
    """key -> :func:`fetch`'s ``(bytes, full after)`` for every key the participant must fetch
    in round ``round_idx`` (arguments as :func:`download_bytes`; ``sizes`` = ``full_sizes``)."""
    out = {}
    for key, size in sizes.items():
        full = trained is None or key in trained or key not in quantized_sizes
        got = fetch(holding, key, full=full, size=size, quantized_size=quantized_sizes.get(key),
                    last_change=last_change.get(key), delta_size=(delta_sizes or {}).get(key), changed=changed,
                    round_idx=round_idx)
        if got is not None:
            out[key] = got
    return out


def download_bytes(holding: Optional[Holding], *, full_sizes: Mapping, quantized_sizes: Mapping,
                   trained: Optional[set], last_change: Mapping, other_bytes: int,
                   delta_sizes: Optional[Mapping] = None, changed: Optional[Mapping[int, set]] = None,
                   round_idx: int = 0) -> int:
    """Bytes the participant fetches.

    Args:
        holding: what it holds (None: it never synced; it fetches everything, plus
            ``other_bytes`` of weights no round changes, e.g. embeddings and attention).
        full_sizes / quantized_sizes: per key, bytes in full precision / as an int-N copy
            (dense keys have no quantized size: always full precision).
        trained: the expert keys it trains this round (None: it needs everything in full precision).
        last_change: :func:`last_changes` of the run.
        delta_sizes / changed / round_idx: with ``broadcast_bits``, per key the packed bytes of
            one round delta, the run's per-round changed keys and the current round
            (:func:`fetch`); None: tensors are only fetched whole.
    """
    fetched = round_fetches(holding, round_idx, sizes=full_sizes, trained=trained, quantized_sizes=quantized_sizes,
                            last_change=last_change, delta_sizes=delta_sizes, changed=changed)
    return int((other_bytes if holding is None else 0) + sum(nbytes for nbytes, _ in fetched.values()))


def after_download(holding: Optional[Holding], round_idx: int, *, keys: Mapping, trained: Optional[set],
                   quantized_sizes: Mapping, last_change: Mapping, delta_sizes: Optional[Mapping] = None,
                   changed: Optional[Mapping[int, set]] = None) -> Holding:
    """What the participant holds after its download of round ``round_idx`` (``keys``: key ->
    full-precision bytes; the other arguments as :func:`download_bytes`)."""
    fetched = round_fetches(holding, round_idx, sizes=keys, trained=trained, quantized_sizes=quantized_sizes,
                            last_change=last_change, delta_sizes=delta_sizes, changed=changed)
    return {**(holding or {}), **{key: (round_idx, full) for key, (_, full) in fetched.items()}}
