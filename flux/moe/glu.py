"""Which gated-linear unit does a module compute?  Decided by probing, not by class names.

``flux.ops.merged_moe`` computes ``f(h[:I]) * h[I:]`` with f = SiLU or exact-erf GELU on the
gate-up projection ``h`` (rows ``[0, I)`` gate, ``[I, 2I)`` up).  A transformers experts module
states its GLU through ``_apply_gate`` (default: ``act_fn(gate) * up`` on the two halves; GPT-OSS
and others override it with clamps, offsets or interleaving), and a ModuleList expert through
its ``act_fn`` (or, when the activation is written inline in ``forward`` and is no attribute,
the whole expert: :func:`probe_expert`).  Instead of trusting flags or class names we evaluate the
function on a fixed probe and compare it with known candidates; anything the kernel cannot run (a
clamp, a tanh-GELU, ReLU, relu^2, ...) is reported as not expressible and the caller falls back
to the model's own code.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux.ops.library import ACTIVATIONS as KERNEL_ACTIVATIONS


def _gelu_tanh(z: Tensor) -> Tensor:
    return F.gelu(z, approximate="tanh")


# activations a probe can name (so a fallback warning can say which one it saw) ...
KNOWN_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu,
}
# ... and the subset flux.ops.merged_moe runs
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {k: KNOWN_ACTIVATIONS[k] for k in KERNEL_ACTIVATIONS}
# names an adapter may return from ``activation()`` instead of a callable
ACTIVATION_ALIASES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh",
                      "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}
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


def identify_activation(act: Callable[[Tensor], Tensor], device: torch.device | str = "cpu") -> Optional[str]:
    """The name in :data:`KNOWN_ACTIVATIONS` of what ``act`` computes (elementwise, float64), else None."""
    z = _probe_values(257, torch.device(device))
    try:
        with torch.no_grad():
            out = act(z.clone())
    except Exception:  # an activation that rejects float64 or the device: not ours to run
        return None
    if not isinstance(out, Tensor):
        return None
    for name, fn in KNOWN_ACTIVATIONS.items():
        if _close(out.double(), fn(z)):
            return name
    return None


def probe_activation(act: Callable[[Tensor], Tensor], device: torch.device | str = "cpu") -> Optional[str]:
    """'silu' or 'gelu' (what the kernel runs) if ``act`` computes it (elementwise, float64), else None."""
    name = identify_activation(act, device)
    return name if name in ACTIVATIONS else None


# pre-activation RMS of the expert probe's token groups: 1.5 keeps most values where SiLU, GELU,
# tanh-GELU and ReLU differ (|z| < 4; near 0 SiLU and GELU agree to first order, so tiny inputs
# cannot tell them apart), 6 reaches the magnitudes where clamps show up
_EXPERT_PROBE_RMS = (1.5, 6.0)
_FLOAT64_TOL = 1e-10  # normwise; the candidates differ by >= 1e-5 (GELU vs tanh-GELU)
_NATIVE_TOL_EPS = 8.0  # in units of the expert dtype's eps; SiLU vs GELU differ by ~15 eps at bf16


def _rel_err(out: Tensor, ref: Tensor, groups: int) -> float:
    """Largest normwise relative error over the probe's token groups (so the large-magnitude
    group cannot drown the differences of the small one)."""
    worst = 0.0
    for o, r in zip(out.chunk(groups), ref.chunk(groups)):
        scale = float(r.norm())
        err = float((o - r).norm())
        if scale == 0.0:
            if err != 0.0:
                return float("inf")
            continue
        worst = max(worst, err / scale)
    return worst


def _expert_output(expert: nn.Module, x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """expert(x) with its floating parameters/buffers cast to ``dtype`` (None: as they are), without
    touching the module (torch.func.functional_call) or the global RNG (dropout would draw)."""
    state = {}
    if dtype is not None:
        for n, t in list(expert.named_parameters()) + list(expert.named_buffers()):
            if t.is_floating_point():
                state[n] = t.detach().to(dtype)
    devices = []
    if x.device.type == "cuda":
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()]
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        out = torch.func.functional_call(expert, state, (x,)) if state else expert(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"{type(expert).__name__}.forward returned {type(out).__name__}, not a tensor")
    return out


def probe_expert(
    expert: nn.Module,
    projections: Sequence[nn.Linear],
    *,
    tokens: int = 16,
    seed: int = 1234,
    precisions: Sequence[str] = ("float64", "native"),
) -> tuple[Optional[str], str]:
    """Which act makes ``expert(x) == down(act(gate(x)) * up(x))``?  For experts whose activation
    is written inline in ``forward`` (no ``act_fn`` attribute to probe).

    Args:
        expert: the expert module; called as ``expert(x)`` with x [N, H], without gradients.
        projections: its (gate, up, down) nn.Linear ([I, H], [I, H], [H, I] weights), as the
            adapter's ``projections`` gives them; the candidates are computed from these.
        tokens: probe tokens per magnitude group (two groups, pre-activation RMS 1.5 and 6).
        seed: the probe input's seed (a private generator; the global RNG is left as it was).
        precisions: tried in order until one identifies the activation.  ``"float64"`` runs the
            expert with float64 copies of its parameters (exact: tolerance 1e-10 normwise);
            ``"native"`` runs it in its own dtype with a tolerance of 8 eps of that dtype (coarser:
            at bfloat16 GELU and tanh-GELU are not told apart, which is reported as ambiguous).

    Returns:
        (name, detail): name is a key of :data:`KNOWN_ACTIVATIONS` (possibly one the kernel does
        not run) or None; detail says how it was decided or why nothing matched.
    """
    gate, up, down = projections
    weight = gate.weight
    if weight.device.type == "meta":
        return None, "its weights are on the meta device, so its forward cannot be probed"
    if not weight.is_floating_point():
        return None, f"its gate projection weight is {weight.dtype}"
    device, native = weight.device, weight.dtype
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(_EXPERT_PROBE_RMS) * tokens, gate.in_features, generator=gen, dtype=torch.float64).to(device)
    with torch.no_grad():
        z0 = F.linear(x, weight.double())
        rms = z0.pow(2).mean().sqrt()
        if not bool(torch.isfinite(rms)) or float(rms) == 0.0:
            return None, "its gate projection is zero or not finite on the probe"
        scale = torch.tensor(_EXPERT_PROBE_RMS, dtype=torch.float64, device=device).repeat_interleave(tokens)
        x = x * (scale / rms).unsqueeze(1)
    details = []
    for precision in precisions:
        if precision == "native" and native == torch.float64 and "float64" in precisions:
            continue  # same computation as the float64 probe
        dtype = torch.float64 if precision == "float64" else native
        xp = x.to(dtype)
        try:
            out = _expert_output(expert, xp, torch.float64 if precision == "float64" else None)
        except Exception as exc:  # e.g. a device without float64 (MPS) or a forward with other inputs
            details.append(f"{precision}: forward raised {type(exc).__name__}: {exc}")
            continue
        with torch.no_grad():
            xd = xp.double()
            g, u = (F.linear(xd, p.weight.double(), None if p.bias is None else p.bias.double()) for p in (gate, up))
            wd, bd = down.weight.double(), None if down.bias is None else down.bias.double()
            if out.shape != (x.shape[0], down.out_features) or not bool(torch.isfinite(out).all()):
                details.append(f"{precision}: output {tuple(out.shape)} {out.dtype} is not [N, H] and finite")
                continue
            errs = {n: _rel_err(out.double(), F.linear(fn(g) * u, wd, bd), len(_EXPERT_PROBE_RMS))
                    for n, fn in KNOWN_ACTIVATIONS.items()}
        tol = _FLOAT64_TOL if precision == "float64" else _NATIVE_TOL_EPS * torch.finfo(dtype).eps
        matches = [n for n, e in errs.items() if e <= tol]
        if len(matches) == 1:
            return matches[0], f"{precision} probe, relative error {errs[matches[0]]:.1e}"
        if len(matches) > 1:
            details.append(f"{precision}: ambiguous between {', '.join(matches)} at {str(dtype).replace('torch.', '')}")
            continue
        best = min(errs, key=errs.get)
        details.append(f"{precision}: closest is {best} with relative error {errs[best]:.1e} > {tol:.0e}")
    return None, "; ".join(details) or "no precision was probed"


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
