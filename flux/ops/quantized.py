"""QuantizedTensor: symmetric per-group int4/int8 weights (flux/ops/contracts.md, quantize)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight stored as integers plus one fp32 scale per ``group_size`` consecutive columns.

    Attributes:
        qdata: int4: uint8 [R, ceil(C/2)] (two values a byte, low nibble first, stored +8);
            int8: int8 [R, C].  R is the product of the leading dims of ``shape``.
        scales: float32 [R, ceil(C/group_size)].
        bits: 4 or 8.
        group_size: columns per scale.
        shape: the original shape (..., C).
        dtype: the original floating dtype, the default of :meth:`dequantize`.
    """

    qdata: Tensor
    scales: Tensor
    bits: int
    group_size: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (integers plus scales)."""
        return self.qdata.numel() * self.qdata.element_size() + self.scales.numel() * 4

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight, shape ``self.shape``, in ``dtype`` (default: the original dtype)."""
        from flux.ops.library import dequantize_rows

        rows = dequantize_rows(self.qdata, self.scales, self.bits, self.group_size, self.cols, dtype or self.dtype)
        return rows.view(self.shape)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        return QuantizedTensor(
            self.qdata.to(device), self.scales.to(device), self.bits, self.group_size, self.shape, self.dtype
        )

    def __getitem__(self, index: int) -> "QuantizedTensor":
        """Slice along the first dim (e.g. one expert of a [E, N, K] stack)."""
        if len(self.shape) < 2:
            raise IndexError("cannot index a 1-D quantized tensor")
        per = math.prod(self.shape[1:-1])
        lo = index * per
        return QuantizedTensor(
            self.qdata[lo : lo + per], self.scales[lo : lo + per], self.bits, self.group_size,
            torch.Size(self.shape[1:]), self.dtype,
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, bits={self.bits}, "
            f"group_size={self.group_size}, dtype={self.dtype}, device={self.device})"
        )
