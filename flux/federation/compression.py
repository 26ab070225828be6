"""Compressed weight deltas on the wire: int-N per-group quantization of what a round moves.

Two directions, each a config option that every method gets alike (docs/federation.md
"Compressed transfers"):

* ``upload_bits`` = N: a participant sends its expert and dense deltas as int-N copies
  (:func:`flux.ops.quantize`, symmetric, one fp32 scale per 64 columns); the server aggregates
  what it received, i.e. the dequantized deltas, and the clock counts the packed bytes.
* ``broadcast_bits`` = N: the server applies each round's aggregate to the global model as an
  int-N delta, so a participant that holds a full-precision copy of a tensor can bring it up to
  date from the round deltas it missed (their packed bytes) instead of fetching the tensor; it
  takes whichever is smaller.  Because the server applies the very delta it sends, every
  participant reconstructs the global tensor exactly: nothing drifts.

Rounding to the nearest of 2 * (2^(N-1) - 1) + 1 levels of the group's absmax moves an element
by at most absmax / (2 * (2^(N-1) - 1)); docs/federation.md gives the measured effect on the
bench's curves.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from flux.federation.downloads import GROUP_SIZE  # columns per scale, as the read-only copies


def packed_bytes(shape: torch.Size | tuple, bits: int, element_size: int = 4) -> int:
    """Wire bytes of a tensor of ``shape`` sent as int-``bits`` (0: ``element_size`` bytes each).

    The int-N layout of :class:`flux.ops.QuantizedTensor`: per row of the last dim,
    ceil(C * N / 8) bytes of integers plus one fp32 scale per ``GROUP_SIZE`` columns.
    """
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= int(s)
    if not bits:
        return numel * element_size
    if len(shape) == 0:
        rows, cols = 1, 1
    else:
        cols = int(shape[-1])
        rows = numel // cols if cols else 0
    return rows * (-(-cols * bits // 8) + 4 * -(-cols // GROUP_SIZE))


def compress_tensor(t: Tensor, bits: int) -> Tensor:
    """``t`` (float, any shape) after an int-``bits`` round trip, same shape and dtype; ``t``
    itself when ``bits`` is 0."""
    from flux.ops import quantize

    if not bits or t.numel() == 0:
        return t
    flat = t.detach().reshape(1) if t.dim() == 0 else t.detach()
    return quantize(flat.float(), bits, GROUP_SIZE).dequantize().to(t.dtype).reshape(t.shape)


def compress_deltas(expert_deltas: Mapping, dense_deltas: Mapping[str, Tensor], bits: int) -> tuple[dict, dict, int]:
    """An update's deltas as the receiver sees them after an int-``bits`` transfer.

    Args:
        expert_deltas: (layer, expert) -> {"gate_up" [2I, H], "down" [H, I] (, biases)}.
        dense_deltas: parameter name -> delta tensor.
        bits: 0 (unchanged, full-precision bytes), 8 or 4.

    Returns:
        ``(expert_deltas, dense_deltas, wire_bytes)``: the dequantized deltas (same keys, shapes
        and dtypes) and the bytes they take on the wire.
    """
    if bits not in (0, 4, 8):
        raise ValueError(f"bits must be 0, 4 or 8, got {bits!r}")
    experts = {key: {name: compress_tensor(t, bits) for name, t in d.items()} for key, d in expert_deltas.items()}
    dense = {name: compress_tensor(t, bits) for name, t in dense_deltas.items()}
    wire = sum(packed_bytes(t.shape, bits, t.element_size()) for d in expert_deltas.values() for t in d.values())
    wire += sum(packed_bytes(t.shape, bits, t.element_size()) for t in dense_deltas.values())
    return experts, dense, int(wire)
