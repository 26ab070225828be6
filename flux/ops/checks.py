"""Argument checks shared by the public ops (flux.ops.api), QuantizedTensor and the custom ops
(flux.ops.library).

Every failure names the argument and states what was expected and what was given.  The
exception type says what kind of mistake it is:

- ``TypeError``: wrong Python type (a bool where an int is expected, a list where a tensor is)
  or wrong tensor dtype;
- ``ValueError``: wrong rank, shape, size, value, device or layout;
- ``IndexError``: index values out of range (expert ids, group ids, a QuantizedTensor index).

The checks read only metadata (dtype, shape, strides, device), except :func:`check_index_values`,
which reads the data and is therefore called only inside the custom-op bodies, on CPU tensors
(on a GPU it would synchronise the host; the GPU kernels treat out-of-range ids as dropped).
Messages are formatted only on failure: the checks run on every call of the hot ops.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
from torch import Tensor

# What the public ops accept; float64 is computed in fp32 by quantize / route_profile.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def describe(value: Any) -> str:
    """A short description of a bad value for an error message."""
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, bool):
        return f"bool {value!r}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_int(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as a Python int, in ``[lo, hi]`` where given.

    A bool is rejected although it is an int subclass (``group_size=True`` is a mistake, not 1);
    numpy integers and other ``__index__`` types are accepted.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        index = None
        if not isinstance(value, bool) and type(value).__name__ != "bool_":
            try:
                index = operator.index(value)
            except TypeError:
                pass
        if index is None:
            raise TypeError(f"{name} must be an int, got {describe(value)}")
        value = index
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_text = "-inf" if lo is None else str(lo)
        hi_text = "inf" if hi is None else str(hi)
        raise ValueError(f"{name} must be an int in [{lo_text}, {hi_text}], got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` must be a bool (``renormalize="no"`` would otherwise mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)} (a str), got {describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_tensor(
    value: Any,
    name: str,
    dtypes: Sequence[torch.dtype] | None = None,
    dim: int | None = None,
    layout: str = "",
    contiguous: bool = False,
) -> Tensor:
    """``value`` must be a Tensor with one of ``dtypes``, ``dim`` dims (``layout`` names them,
    e.g. "[T, H]"), and contiguous if asked."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor{' ' + layout if layout else ''}, got {describe(value)}")
    if dtypes is not None and value.dtype not in dtypes:
        kind = "floating" if all(d.is_floating_point for d in dtypes) else "integer" if not any(
            d.is_floating_point for d in dtypes) else "of"
        raise TypeError(f"{name} must be {kind} with dtype {_dtype_names(dtypes)}, got dtype {value.dtype}")
    if dim is not None and value.dim() != dim:
        raise ValueError(
            f"{name} must be a {dim}-D tensor{' ' + layout if layout else ''}, got shape {tuple(value.shape)}"
        )
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(value.shape)} strides {value.stride()}")
    return value


def check_same_device(value: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {value.device}")


def check_index_values(value: Tensor, name: str, lo: int, hi: int, meaning: str) -> None:
    """Integer ``value`` (any int dtype) must lie in ``[lo, hi)``; checked on CPU tensors only.

    The values are read as they are, before any narrowing to int32, so an int64 2**32 is
    reported, not silently wrapped to 0.
    """
    if value.device.type != "cpu" or value.numel() == 0:
        return
    vmin, vmax = int(value.min()), int(value.max())
    if vmin < lo or vmax >= hi:
        bad = vmax if vmax >= hi else vmin
        raise IndexError(
            f"{name}: values must fit int32 and lie in [{lo}, {hi}) ({meaning}), "
            f"got min {vmin}, max {vmax} (offending value {bad})"
        )
