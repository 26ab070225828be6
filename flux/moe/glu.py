"""Which gated-linear unit does a module compute?  Decided by probing, not by class names.

``flux.ops.merged_moe`` computes ``f(h[:I]) * h[I:]`` with f = SiLU or exact-erf GELU on the
gate-up projection ``h`` (rows ``[0, I)`` gate, ``[I, 2I)`` up).  A transformers experts module
states its GLU through ``_apply_gate`` (default: ``act_fn(gate) * up`` on the two halves; GPT-OSS
and others override it with clamps, offsets or interleaving), and a ModuleList expert through
its ``act_fn``.  Instead of trusting flags or class names we evaluate the function on a fixed
probe and compare it with the candidates the kernel can run; anything else (a clamp, a tanh-GELU,
relu^2, ...) is reported as not expressible and the caller falls back to transformers' own code.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu, "gelu": F.gelu}
LAYOUTS = ("concat", "interleaved")


def _probe_values(n: int, device: torch.device) -> Tensor:
    """Deterministic probe: dense near 0 (where GELU variants differ most) and large magnitudes
    (where clamps show up), float64."""
    gen = torch.Generator().manual_seed(1234)
    dense = torch.linspace(-4.0, 4.0, n, dtype=torch.float64)
    wide = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 40.0
    return torch.stack((dense, wide, dense.flip(0) * 2.5)).to(device)


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or not torch.isfinite(a).all():
        return False
    return bool(((a - b).abs() <= 1e-9 + 1e-7 * b.abs()).all())


def probe_activation(act: Callable[[Tensor], Tensor], device: torch.device | str = "cpu") -> Optional[str]:
    """'silu' or 'gelu' if ``act`` computes it (elementwise, float64), else None."""
    z = _probe_values(257, torch.device(device))
    try:
        with torch.no_grad():
            out = act(z.clone())
    except Exception:  # an activation that rejects float64 or the device: not ours to run
        return None
    if not isinstance(out, Tensor):
        return None
    for name, fn in ACTIVATIONS.items():
        if _close(out.double(), fn(z)):
            return name
    return None


def probe_glu(
    apply_gate: Callable[[Tensor], Tensor], intermediate: int, device: torch.device | str = "cpu"
) -> tuple[Optional[str], Optional[str]]:
    """(activation, layout) computed by ``apply_gate`` on [N, 2I] inputs, or (None, None).

    layout 'concat': gate = h[:, :I], up = h[:, I:];  'interleaved': gate = h[:, 0::2], up = h[:, 1::2].
    """
    z = _probe_values(2 * intermediate * 3, torch.device(device)).reshape(-1, 2 * intermediate)
    try:
        with torch.no_grad():
            out = apply_gate(z.clone())
    except Exception:
        return None, None
    if not isinstance(out, Tensor) or out.shape != (z.shape[0], intermediate):
        return None, None
    out = out.double()
    for layout in LAYOUTS:
        gate, up = (z[:, :intermediate], z[:, intermediate:]) if layout == "concat" else (z[:, 0::2], z[:, 1::2])
        for name, fn in ACTIVATIONS.items():
            if _close(out, fn(gate) * up):
                return name, layout
    return None, None
