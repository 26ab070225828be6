"""QuantizedTensor: symmetric per-group int4/int8 weights (flux/ops/contracts.md, quantize)."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from flux.ops.checks import FLOAT_DTYPES, check_int, check_tensor, describe

QDATA_DTYPE = {4: torch.uint8, 8: torch.int8}


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight stored as integers plus one fp32 scale per ``group_size`` consecutive columns.

    Attributes:
        qdata: int4: uint8 [R, ceil(C/2)] (two values a byte, low nibble first, stored +8);
            int8: int8 [R, C].  Contiguous.  R is the product of the leading dims of ``shape``.
        scales: float32 [R, ceil(C/group_size)], contiguous, on the device of ``qdata``.
        bits: 4 or 8.
        group_size: columns per scale, a positive int.
        shape: the original shape (..., C), at least 1-D (a tuple is converted to torch.Size).
        dtype: the original floating dtype, the default of :meth:`dequantize`.

    The invariants are checked at construction and again (:meth:`validate`) before every kernel
    that consumes the tensor: the dataclass is frozen, but its tensors can still be resized or
    replaced in place, and a stale layout must fail with a message, not deep in a kernel.
    """

    qdata: Tensor
    scales: Tensor
    bits: int
    group_size: int
    shape: torch.Size
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if isinstance(self.shape, (tuple, list)) and not isinstance(self.shape, torch.Size):
            object.__setattr__(self, "shape", torch.Size(self._shape_ints(self.shape, "QuantizedTensor")))
        self.validate()

    @staticmethod
    def _shape_ints(shape: Sequence, name: str) -> list[int]:
        return [check_int(s, f"{name}.shape[{i}]", lo=0) for i, s in enumerate(shape)]

    def validate(self, name: str = "QuantizedTensor") -> "QuantizedTensor":
        """Raise TypeError / ValueError naming the field (``{name}.scales`` ...) if an invariant
        does not hold; returns self.  Metadata only, no data is read."""
        bits = check_int(self.bits, f"{name}.bits")
        if bits not in QDATA_DTYPE:
            raise ValueError(f"{name}.bits must be 4 or 8, got {bits}")
        group_size = check_int(self.group_size, f"{name}.group_size", lo=1)
        if not isinstance(self.shape, (tuple, list)) or len(self.shape) < 1:
            raise ValueError(f"{name}.shape must be a non-empty torch.Size (..., C), got {describe(self.shape)}")
        shape = self._shape_ints(self.shape, name)
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}.dtype must be a floating torch.dtype (float32/bfloat16/float16/float64), "
                f"got {describe(self.dtype)}"
            )
        cols, rows = shape[-1], math.prod(shape[:-1])
        qdata = check_tensor(self.qdata, f"{name}.qdata", (QDATA_DTYPE[bits],), dim=2, contiguous=True)
        scales = check_tensor(self.scales, f"{name}.scales", (torch.float32,), dim=2, contiguous=True)
        qcols = cols if bits == 8 else (cols + 1) // 2
        if tuple(qdata.shape) != (rows, qcols):
            raise ValueError(
                f"{name}.qdata must have shape [{rows}, {qcols}] for shape {tuple(shape)} at {bits} bits "
                f"([prod(shape[:-1]), {'C' if bits == 8 else 'ceil(C / 2)'}]), got {tuple(qdata.shape)}"
            )
        n_groups = -(-cols // group_size)
        if tuple(scales.shape) != (rows, n_groups):
            raise ValueError(
                f"{name}.scales must have shape [{rows}, {n_groups}] ([R, ceil(C / group_size)] with "
                f"C = {cols}, group_size = {group_size}), got {tuple(scales.shape)}"
            )
        if scales.device != qdata.device:
            raise ValueError(f"{name}.scales must be on the device of qdata ({qdata.device}), got {scales.device}")
        return self

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
        """The dense weight, shape ``self.shape``, in ``dtype`` (a floating dtype; default: the
        original dtype)."""
        from flux.ops.library import dequantize_rows

        self.validate()
        if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES):
            raise TypeError(
                f"dtype must be None or a floating torch.dtype (float32/bfloat16/float16/float64), "
                f"got {describe(dtype)}"
            )
        rows = dequantize_rows(self.qdata, self.scales, self.bits, self.group_size, self.cols, dtype or self.dtype)
        return rows.view(self.shape)

    def to(self, device: torch.device | str | int) -> "QuantizedTensor":
        """The same quantized weight on ``device`` (the integer storage is kept; use
        :meth:`dequantize` to change the dtype)."""
        self.validate()
        if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
            raise TypeError(
                f"device must be a torch.device, str or int, got {describe(device)} (the integer storage is kept: "
                "use dequantize(dtype) for a dense tensor of another dtype)"
            )
        return QuantizedTensor(
            self.qdata.to(device), self.scales.to(device), self.bits, self.group_size, self.shape, self.dtype
        )

    def __getitem__(self, index: int | slice) -> "QuantizedTensor":
        """Index or slice the first dim (e.g. one expert of a [E, N, K] stack), with Python
        semantics: negative indices count from the end; slices must have step 1."""
        self.validate()
        if len(self.shape) < 2:
            raise IndexError(
                f"cannot index a 1-D QuantizedTensor (shape {tuple(self.shape)}): rows of the last dim "
                "share packed bytes and scales"
            )
        size = self.shape[0]
        per = math.prod(self.shape[1:-1])  # rows of qdata per index of the first dim
        if isinstance(index, slice):
            start, stop, step = index.indices(size)
            if step != 1:
                raise ValueError(f"index: a QuantizedTensor slice must have step 1, got {index}")
            stop = max(stop, start)
            shape = torch.Size((stop - start, *self.shape[1:]))
        else:
            try:
                i = None if isinstance(index, bool) else operator.index(index)
            except TypeError:
                i = None
            if i is None:
                raise TypeError(f"index must be an int or a slice of the first dim, got {describe(index)}")
            if not -size <= i < size:
                raise IndexError(
                    f"index {i} is out of range for the first dim of QuantizedTensor shape "
                    f"{tuple(self.shape)} (valid: [{-size}, {size}))"
                )
            start = i + size if i < 0 else i
            stop = start + 1
            shape = torch.Size(self.shape[1:])
        lo, hi = start * per, stop * per
        return QuantizedTensor(
            self.qdata[lo:hi], self.scales[lo:hi], self.bits, self.group_size, shape, self.dtype
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, bits={self.bits}, "
            f"group_size={self.group_size}, dtype={self.dtype}, device={self.device})"
        )
