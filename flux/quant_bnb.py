"""Optional bitsandbytes NF4/FP4 storage for frozen (and FMQ) expert weights.

flux's own path (:func:`flux.ops.quantize`: symmetric int4/int8, one fp32 scale per group) is
the default everywhere and needs nothing beyond torch.  This module is the measured alternative
of docs/bitsandbytes.md: bitsandbytes' 4-bit *NormalFloat* (``nf4``) or ``fp4`` codes, one fp32
absmax per ``blocksize`` consecutive elements (optionally the absmax themselves quantized to
8 bits: ``nested=True``, bitsandbytes' "double quantization").  At equal bytes (block 64 = our
group 64: 0.5625 B/parameter) NF4 reconstructs trained-like weights with lower error than
int4 (14-24 %) and dequantizes 2-4x faster on CPU; quantizing is 4-6x slower (see the doc).

It needs ``bitsandbytes`` (``pip install -c requirements/constraints.txt 'flux-moe[bnb]'``, or
``bitsandbytes==0.50.2``); importing this module works without it, the first call raises an
:class:`ImportError` that says so.

    q = quantize_frozen(w, kind="nf4", blocksize=64)   # w: float [..., C], any device bnb supports
    w_hat = dequantize_frozen(q)                        # or q.dequantize(torch.bfloat16)
    q.nbytes                                            # codes + absmax + quantization state
    q[j]                                                # expert j of a [G, N, K] stack

:func:`stochastic_quantize` is the FMQ counterpart of :func:`flux.methods.fmq.stochastic_quantize`
on the NF4/FP4 grid (unbiased rounding between the two neighbouring code values of a block).
:func:`adamw8bit` / :func:`adamw8bit_state_bytes` wrap ``bitsandbytes.optim.AdamW8bit`` (8-bit
moments for float weights) and give its state bytes for memory accounting.

Nothing in flux uses this module by default.  Three config options do (docs/bitsandbytes.md,
"Options"): ``flux.frozen_format = "nf4"`` (merged frozen groups, :class:`flux.moe.MergedView`),
``fmq.weight_format = "nf4"`` (:class:`flux.methods.fmq.QuantizedAdamW`) and
``flux.optimizer = "adamw8bit"`` (:func:`flux.federation.local.train_local`); :func:`require`
gives the error naming the option when bitsandbytes is missing.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

KINDS = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.functional.quantize_4bit accepts
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BNB_VERSION = "0.50.2"  # the version measured in docs/bitsandbytes.md (requirements/dev.txt pins it)
INSTALL_HINT = (
    "flux.quant_bnb needs bitsandbytes: pip install -c requirements/constraints.txt "
    f"bitsandbytes=={BNB_VERSION} (or the 'bnb' extra of flux-moe). flux's own int4/int8 path, "
    "flux.ops.quantize, needs nothing extra."
)

_functional: Any = None


class _DropOptionalKernelWarning(logging.Filter):
    """bitsandbytes' CPU backend warns at import that an optional fused CPU gemv (the 'kernels'
    package) is missing; nothing here uses it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def bnb_functional():
    """``bitsandbytes.functional``, imported on first use; ImportError with the install line."""
    global _functional
    if _functional is None:
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelWarning())
        try:
            import bitsandbytes.functional as functional
        except ImportError as exc:
            raise ImportError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
        _functional = functional
    return _functional


def available() -> bool:
    """Whether bitsandbytes can be imported."""
    try:
        bnb_functional()
    except ImportError:
        return False
    return True


def require(option: str) -> None:
    """Raise an ImportError naming ``option`` (what asked for bitsandbytes, e.g.
    ``"flux.frozen_format = 'nf4'"``) and the install line when bitsandbytes is missing."""
    try:
        bnb_functional()
    except ImportError as exc:
        raise ImportError(f"{option} needs bitsandbytes, which is not importable: {exc}") from exc


def _state_bytes(state: Any) -> int:
    """Bytes of every tensor a bitsandbytes QuantState holds (absmax, code, nested state)."""
    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, Tensor):
            total += t.numel() * t.element_size()
    if getattr(state, "state2", None) is not None:
        total += _state_bytes(state.state2)
    return total


def _copy_state(state: Any, device: Any = None, dtype: Optional[torch.dtype] = None,
                shape: Optional[torch.Size] = None) -> Any:
    """A new QuantState (bitsandbytes' ``QuantState.to`` moves in place), optionally on
    ``device``, with output ``dtype`` (the kernels write that dtype directly) or ``shape``."""
    F = bnb_functional()

    def move(t):
        return t if t is None or device is None else t.to(device)

    return F.QuantState(absmax=move(state.absmax), shape=state.shape if shape is None else shape, code=move(state.code),
                        blocksize=state.blocksize, quant_type=state.quant_type,
                        dtype=state.dtype if dtype is None else dtype, offset=move(state.offset),
                        state2=None if state.state2 is None else _copy_state(state.state2, device=device))


def _dequantize_reference(q: "BnbQuantized", dtype: torch.dtype) -> Tensor:
    """Plain-torch dequantization (bitsandbytes' definition: code[nibble] * absmax of the block,
    blocks over the flattened tensor, the high nibble first)."""
    F = bnb_functional()
    state = q.state
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    n = q.shape.numel()
    b = q.packed.reshape(-1)
    codes = torch.stack((b >> 4, b & 0x0F), dim=1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(state.blocksize)[:n]
    return (state.code.float()[codes] * scale).to(dtype).reshape(q.shape)


@dataclass(frozen=True)
class BnbQuantized:
    """A weight as bitsandbytes 4-bit codes (``packed``: uint8, two codes a byte) plus its
    ``state`` (a ``bitsandbytes.functional.QuantState``: absmax per block, code book, shape,
    dtype, blocksize, quant_type, and for ``nested`` the 8-bit absmax state)."""

    packed: Tensor
    state: Any

    @classmethod
    def from_buffers(cls, packed: Tensor, absmax: Tensor, kind: str, blocksize: int, shape: Sequence[int],
                     dtype: torch.dtype, code: Optional[Tensor] = None) -> "BnbQuantized":
        """Rebuild from the tensors a module keeps as buffers (``q.packed``: uint8 [ceil(n / 2), 1],
        ``q.state.absmax``: fp32 [ceil(n / blocksize)], not nested; optionally ``q.state.code``: fp32
        [16], else the ``kind`` code book is rebuilt), e.g. after ``module.to(device)`` moved them."""
        _check_kind_block(kind, blocksize)
        F = bnb_functional()
        book = _code_tables(kind, packed.device)[1] if code is None else code
        state = F.QuantState(absmax=absmax, shape=torch.Size(shape), code=book, blocksize=blocksize,
                             quant_type=kind, dtype=dtype)
        return cls(packed, state)

    @property
    def kind(self) -> str:
        return self.state.quant_type

    @property
    def blocksize(self) -> int:
        return self.state.blocksize

    @property
    def nested(self) -> bool:
        return bool(self.state.nested)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.state.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.state.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: codes, absmax and the rest of the quantization state."""
        return self.packed.numel() * self.packed.element_size() + _state_bytes(self.state)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight, shape ``self.shape``, in ``dtype`` (default: the original dtype)."""
        F = bnb_functional()
        out_dtype = self.dtype if dtype is None else dtype
        if out_dtype not in INPUT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16 (bitsandbytes' outputs), got {out_dtype}")
        n, block = self.shape.numel(), self.blocksize
        if n % block == 0:
            # bitsandbytes 0.50.2's AVX-512 CPU kernel misplaces the absmax when the last dim is
            # not a multiple of blocksize (e.g. [64, 96] at block 64); blocks run over the
            # flattened tensor, so dequantize it as [n / block, block] rows, one block each
            state = _copy_state(self.state, dtype=out_dtype, shape=torch.Size((n // block, block)))
            return F.dequantize_4bit(self.packed, state).reshape(self.shape)
        if self.device.type == "cpu":  # a partial last block: the plain-torch statement
            return _dequantize_reference(self, out_dtype)
        state = _copy_state(self.state, dtype=out_dtype)
        return F.dequantize_4bit(self.packed, state).reshape(self.shape)

    def to(self, device: torch.device | str | int) -> "BnbQuantized":
        """The same codes and state on ``device``."""
        return BnbQuantized(self.packed.to(device), _copy_state(self.state, device=device))

    def __getitem__(self, index: int) -> "BnbQuantized":
        """Entry ``index`` of the first dim (one expert of a [G, N, K] stack), without copying.
        Needs whole blocks per entry (prod(shape[1:]) a multiple of blocksize, even) and no
        nested absmax."""
        F = bnb_functional()
        shape = self.shape
        if len(shape) < 2:
            raise IndexError(f"cannot index a 1-D BnbQuantized (shape {tuple(shape)})")
        per = math.prod(shape[1:])
        if self.nested or per % self.blocksize or per % 2:
            raise ValueError(
                f"BnbQuantized[{index}]: an entry of shape {tuple(shape[1:])} must hold whole blocks of "
                f"{self.blocksize} (and an even count) without nested absmax; dequantize() the whole "
                "tensor instead"
            )
        i = None if isinstance(index, bool) else operator.index(index)
        if not -shape[0] <= i < shape[0]:
            raise IndexError(f"index {i} is out of range for the first dim of shape {tuple(shape)}")
        i %= shape[0]
        blocks = per // self.blocksize
        state = F.QuantState(absmax=self.state.absmax[i * blocks:(i + 1) * blocks], shape=shape[1:],
                             code=self.state.code, blocksize=self.blocksize, quant_type=self.kind,
                             dtype=self.dtype)
        return BnbQuantized(self.packed[i * per // 2:(i + 1) * per // 2], state)

    def __repr__(self) -> str:
        return (f"BnbQuantized(shape={tuple(self.shape)}, kind={self.kind}, blocksize={self.blocksize}, "
                f"nested={self.nested}, dtype={self.dtype}, device={self.device})")


def _check(w: Any, kind: str, blocksize: int) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in INPUT_DTYPES:
        raise TypeError(f"w must be float32, bfloat16 or float16 (bitsandbytes' 4-bit inputs), got {w.dtype}")
    if w.dim() < 1 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty tensor, got shape {tuple(w.shape)}")
    _check_kind_block(kind, blocksize)


def _check_kind_block(kind: str, blocksize: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def frozen_bytes(numel: int, blocksize: int = 64, nested: bool = False) -> int:
    """``quantize_frozen(w, kind, blocksize, nested).nbytes`` for a ``w`` of ``numel`` elements,
    without quantizing (memory estimates): codes, absmax, the 16-entry code book and, nested,
    the 8-bit absmax with their own fp32 absmax per 256, code book and offset."""
    blocks = -(-numel // blocksize)
    codes = (numel + 1) // 2 + 16 * 4
    if not nested:
        return codes + 4 * blocks
    return codes + blocks + 4 * -(-blocks // 256) + 256 * 4 + 4


def quantize_frozen(w: Tensor, kind: str = "nf4", blocksize: int = 64, nested: bool = False) -> BnbQuantized:
    """Round-to-nearest ``kind`` codes of ``w`` (float32/bf16/fp16, any shape), one absmax per
    ``blocksize`` consecutive elements of the flattened tensor (for [G, N, K] stacks with
    K % blocksize == 0 these are blocks of one row, like flux's groups)."""
    _check(w, kind, blocksize)
    F = bnb_functional()
    packed, state = F.quantize_4bit(w.detach().contiguous(), blocksize=blocksize, quant_type=kind,
                                    compress_statistics=bool(nested))
    return BnbQuantized(packed, state)


def dequantize_frozen(q: BnbQuantized, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``q.dequantize(dtype)``."""
    if not isinstance(q, BnbQuantized):
        raise TypeError(f"q must be a BnbQuantized (from quantize_frozen), got {type(q).__name__}")
    return q.dequantize(dtype)


def code_values(kind: str, device: torch.device | str = "cpu") -> Tensor:
    """The distinct values of the ``kind`` code book, ascending (fp32, in [-1, 1])."""
    return _code_tables(kind, torch.device(device))[0]


def _code_tables(kind: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(distinct code values ascending, bitsandbytes' code book, uint8 code index of each
    distinct value)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    F = bnb_functional()
    book = F.get_4bit_type(kind, device=device).float()
    values = torch.unique(book)  # sorted; fp4's two zeros merge
    index = torch.stack([torch.nonzero(book == v)[0, 0] for v in values]).to(torch.uint8)
    return values, book, index


def stochastic_quantize(w: Tensor, kind: str, blocksize: int, generator: torch.Generator) -> BnbQuantized:
    """Like :func:`quantize_frozen` but each value rounds to one of its two neighbouring code
    values at random, with probability given by the distance (E[dequantize] = w): the FMQ rule
    (flux.methods.fmq.stochastic_quantize) on the NF4/FP4 grid.  The absmax are those of
    round-to-nearest (a block's absmax is the code value +-1, so it stays on the grid).
    ``generator`` draws on the CPU.

    The codes are packed here (bitsandbytes' storage layout: two codes a byte, the first in the
    high nibble; the test checks it against ``quantize_frozen`` of the rounded values), which
    saves a second quantization pass."""
    _check(w, kind, blocksize)
    n = w.numel()
    flat = w.detach().reshape(-1).to(torch.float32, copy=True)  # worked on in place below
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n))
    absmax = padded.view(blocks, blocksize).abs().amax(dim=1)  # what quantize_4bit computes
    scale = absmax.repeat_interleave(blocksize)[:n]
    x = flat.div_(torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(-1.0, 1.0)
    values, book, index = _code_tables(kind, flat.device)
    # values[lo] <= x < values[lo + 1] (x = 1: the last interval); 14-15 compares beat bucketize
    # (a binary search per element) several times on CPU
    lo = torch.zeros(n, dtype=torch.uint8, device=flat.device)
    for threshold in values[1:-1].tolist():
        lo += x >= threshold
    lo = lo.long()
    low = values[lo]
    noise = torch.rand(n, generator=generator).to(flat.device)
    up = noise.mul_(values[lo + 1] - low) < x.sub_(low)  # P(up) = (x - lo) / (hi - lo)
    codes = index[lo + up]
    if n % 2:  # bitsandbytes pads with the code of 0
        codes = torch.cat([codes, index[values == 0]])
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    F = bnb_functional()
    state = F.QuantState(absmax=absmax, shape=w.shape, code=book, blocksize=blocksize, quant_type=kind,
                         dtype=w.dtype)
    return BnbQuantized(packed, state)


# ----------------------------------------------------------------------------- 8-bit AdamW

ADAMW8BIT_MIN_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 moments
ADAMW8BIT_BLOCK = 256  # the blocksize of its state quantization (CPU and CUDA kernels)
ADAMW8BIT_SHARED_BYTES = 2 * 256 * 4  # the two 8-bit code books, one per optimizer


def adamw8bit(params: Any, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0, **kwargs: Any):
    """``bitsandbytes.optim.AdamW8bit`` (a ``torch.optim.Optimizer``: parameter groups, state_dict,
    zero_grad like ``torch.optim.AdamW``): the moments stored in 8 bits (dynamic code, block 256),
    the weights stay as they are.  ``kwargs`` go to bitsandbytes (e.g. ``min_8bit_size``)."""
    bnb_functional()  # the install line if it is missing
    import bitsandbytes.optim

    return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


def adamw8bit_state_bytes(numel: int, min_8bit_size: int = ADAMW8BIT_MIN_SIZE) -> int:
    """State bytes :func:`adamw8bit` holds for one parameter of ``numel`` elements (the shared
    code books, :data:`ADAMW8BIT_SHARED_BYTES` per optimizer, not included)."""
    if numel < min_8bit_size:
        return 2 * 4 * numel  # fp32 exp_avg and exp_avg_sq
    return 2 * numel + 2 * 4 * -(-numel // ADAMW8BIT_BLOCK)  # uint8 states + fp32 absmax per block
