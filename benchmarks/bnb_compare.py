"""flux's own int4/int8 quantization against bitsandbytes (NF4/FP4, blockwise 8-bit, AdamW8bit).

    OMP_NUM_THREADS=1 python -m benchmarks.bnb_compare --out benchmarks/results/bnb-cpu.json
    python -m benchmarks.bnb_compare --quick          # one small shape, fewer steps (seconds)

Two parts (docs/bitsandbytes.md has the table and the decision per use case):

**storage** -- for each expert weight of each shape (Mixtral-like ``gate_up`` [2I, H] and
``down`` [H, I]; weights drawn like trained ones: normal, std 0.02, plus a few outliers) and each
codec (flux ``int4``/``int8`` at group 32/64/128/256 via :func:`flux.ops.quantize`; bitsandbytes
``nf4``/``fp4`` at block 32/64/128, ``nf4`` with nested absmax, blockwise 8-bit with its dynamic
map at block 64/256): bytes per parameter (codes + scales/absmax + any other quantization state),
median quantize and dequantize times (codecs of one tensor timed interleaved, so background load
hits them alike) and their ratio to the flux codec of the same bits and group, the relative
Frobenius error ``||W - deq(q(W))|| / ||W||`` and the relative error of ``x @ deq(W).T`` against
``x @ W.T`` for random activations x.

**optimizer** -- one expert (``gate_up`` and ``down`` of the first shape) fine-tuned on a small
regression (reach teacher weights ``W0 + delta`` from ``W0``, fresh random inputs each step, the
same stream for every optimizer) for ``--steps`` steps with: ``torch.optim.AdamW`` (fp32 weights
and moments), ``bitsandbytes.optim.AdamW8bit`` (fp32 weights, 8-bit moments), ``flux-int8-moments``
(fp32 weights, moments stored the way FMQ stores them: int8 group 64, ``exp_avg`` and
``sqrt(exp_avg_sq)``), ``fmq`` (:class:`flux.methods.fmq.QuantizedAdamW`: int4 weights with
stochastic rounding, int8 moments) and ``fmq-nf4`` / ``fmq-fp4`` (the same with the weights on the
bitsandbytes grid, :func:`flux.quant_bnb.stochastic_quantize`).  Reported: stored weight bytes and
optimizer-state bytes per parameter, median ``step()`` time, the final loss (on held-out inputs)
and the distance to the teacher weights.

The JSON records the machine (CPU model), torch/bitsandbytes versions, thread counts, shapes and
every number.  Run with ``OMP_NUM_THREADS=1`` on a shared machine (the default ``--threads 1``
sets torch's count; both kernels' OpenMP pools read the variable).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as TF
from torch import Tensor

from benchmarks.timing import cpu_model
from flux import quant_bnb
from flux.methods import fmq
from flux.ops import quantize

SCHEMA = "flux-bnb-compare/1"
# name -> (hidden H, intermediate I): mixtral-base is flux.models.presets' preset; the second a
# larger Mixtral-like expert that still runs on a CPU in seconds
SHAPES = {"mixtral-base": (256, 384), "mixtral-1k": (1024, 2816)}
WEIGHT_STD = 0.02
OUTLIER_FRACTION = 1e-3  # of the entries, set to +-(OUTLIER_SIGMAS) * std
OUTLIER_SIGMAS = (6.0, 12.0)
TOKENS = 128  # activations of the matmul-error check
ADAM_LR = 3e-4
DELTA_STD = 0.25 * WEIGHT_STD  # fine-tuning delta of the optimizer regression


# ----------------------------------------------------------------------------- weights


def make_weight(shape: tuple[int, ...], seed: int, std: float = WEIGHT_STD,
                outlier_fraction: float = OUTLIER_FRACTION) -> Tensor:
    """fp32 normal(0, std) with ``outlier_fraction`` of the entries replaced by +-U(6, 12) std."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * std
    n = w.numel()
    k = max(1, round(n * outlier_fraction)) if outlier_fraction > 0 else 0
    if k:
        idx = torch.randperm(n, generator=g)[:k]
        lo, hi = OUTLIER_SIGMAS
        mag = (lo + (hi - lo) * torch.rand(k, generator=g)) * std
        sign = torch.randint(0, 2, (k,), generator=g).float() * 2 - 1
        w.view(-1)[idx] = mag * sign
    return w


def shape_dims(name: str) -> tuple[int, int]:
    """(H, I) of a SHAPES name or of ``"HxI"`` (e.g. ``64x96``: the test's tiny expert)."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        hidden, inter = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise ValueError(f"unknown shape {name!r}: one of {list(SHAPES)} or HxI") from None
    if hidden < 1 or inter < 1:
        raise ValueError(f"shape {name!r}: H and I must be >= 1")
    return hidden, inter


def expert_tensors(hidden: int, inter: int, seed: int, outlier_fraction: float = OUTLIER_FRACTION) -> dict[str, Tensor]:
    """One Mixtral-like expert: gate_up [2I, H] and down [H, I]."""
    return {"gate_up": make_weight((2 * inter, hidden), seed, outlier_fraction=outlier_fraction),
            "down": make_weight((hidden, inter), seed + 1, outlier_fraction=outlier_fraction)}


# the weight distributions of the storage part: name -> outlier fraction (errors for each; times
# for the first only, they do not depend on the values)
DISTRIBUTIONS = {"normal+outliers": OUTLIER_FRACTION, "normal": 0.0}


# ----------------------------------------------------------------------------- codecs


@dataclass(frozen=True)
class Codec:
    name: str
    library: str  # "flux" or "bitsandbytes"
    kind: str  # int4 / int8 / nf4 / fp4 / dynamic8
    bits: int
    block: int  # elements per scale (flux: group_size; bnb: blocksize)
    nested: bool
    baseline: str  # the flux codec it is compared with (itself for flux codecs)
    quantize: Callable[[Tensor], Any]
    dequantize: Callable[[Any], Tensor]
    nbytes: Callable[[Any], int]


def _flux_codec(bits: int, group: int) -> Codec:
    return Codec(f"flux-int{bits}-g{group}", "flux", f"int{bits}", bits, group, False, f"flux-int{bits}-g{group}",
                 lambda w: quantize(w, bits=bits, group_size=group), lambda q: q.dequantize(), lambda q: q.nbytes)


def _bnb4_codec(kind: str, block: int, nested: bool = False) -> Codec:
    return Codec(f"bnb-{kind}-b{block}" + ("-nested" if nested else ""), "bitsandbytes", kind, 4, block, nested,
                 f"flux-int4-g{block}", lambda w: quant_bnb.quantize_frozen(w, kind, block, nested),
                 lambda q: q.dequantize(), lambda q: q.nbytes)


def _bnb8_codec(block: int) -> Codec:
    def q8(w: Tensor):
        return quant_bnb.bnb_functional().quantize_blockwise(w, blocksize=block)

    def dq8(q) -> Tensor:
        return quant_bnb.bnb_functional().dequantize_blockwise(q[0], q[1])

    def nb8(q) -> int:
        return q[0].numel() * q[0].element_size() + quant_bnb._state_bytes(q[1])

    return Codec(f"bnb-dynamic8-b{block}", "bitsandbytes", "dynamic8", 8, block, False, f"flux-int8-g{block}",
                 q8, dq8, nb8)


def codecs(quick: bool = False) -> list[Codec]:
    groups = (64,) if quick else (32, 64, 128)
    out = [_flux_codec(4, g) for g in groups]
    out += [_flux_codec(8, g) for g in ((64,) if quick else (64, 256))]
    out += [_bnb4_codec(kind, g) for kind in quant_bnb.KINDS for g in groups]
    out.append(_bnb4_codec("nf4", 64, nested=True))
    out += [_bnb8_codec(b) for b in ((64,) if quick else (64, 256))]
    return out


def relative_error(approx: Tensor, exact: Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


def error_row(codec: Codec, w: Tensor, x: Tensor) -> dict:
    """bytes and reconstruction errors of ``codec`` on ``w`` ([N, K]; x: [T, K])."""
    q = codec.quantize(w)
    w_hat = codec.dequantize(q).float()
    if w_hat.shape != w.shape:
        raise AssertionError(f"{codec.name}: dequantized shape {tuple(w_hat.shape)} != {tuple(w.shape)}")
    nbytes = codec.nbytes(q)
    return {
        "codec": codec.name, "library": codec.library, "kind": codec.kind, "bits": codec.bits,
        "block": codec.block, "nested": codec.nested, "baseline": codec.baseline,
        "bytes": nbytes, "params": w.numel(), "bytes_per_param": nbytes / w.numel(),
        "rel_fro_err": relative_error(w_hat, w),
        "matmul_rel_err": relative_error(x @ w_hat.T, x @ w.T),
        "max_abs_err_over_std": float((w_hat - w).abs().max() / w.std()),
    }


def median_times(fns: dict[str, Callable[[], object]], budget_s: float, min_reps: int,
                 max_reps: int) -> dict[str, list[float]]:
    """Seconds per call of each fn: one warm-up each, then rounds in which every fn runs once
    (interleaved), as many rounds as the budget allows within [min_reps, max_reps]."""
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    per_round = max(sum(first.values()), 1e-9)
    rounds = int(min(max_reps, max(min_reps, budget_s // per_round)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def storage_case(shape_name: str, tensor: str, w: Tensor, cods: list[Codec], *, budget_s: float,
                 min_reps: int, max_reps: int, seed: int, timing: bool = True,
                 distribution: str = "normal+outliers") -> list[dict]:
    x = torch.randn(TOKENS, w.shape[1], generator=torch.Generator().manual_seed(seed))
    rows = [dict(shape=shape_name, tensor=tensor, dims=list(w.shape), distribution=distribution,
                 **error_row(c, w, x)) for c in cods]
    if timing:
        stored = {c.name: c.quantize(w) for c in cods}
        tq = median_times({c.name: (lambda c=c: c.quantize(w)) for c in cods}, budget_s, min_reps, max_reps)
        td = median_times({c.name: (lambda c=c: c.dequantize(stored[c.name])) for c in cods}, budget_s,
                          min_reps, max_reps)
        for row in rows:
            row["quantize_ms"] = statistics.median(tq[row["codec"]]) * 1e3
            row["dequantize_ms"] = statistics.median(td[row["codec"]]) * 1e3
            row["quantize_min_ms"] = min(tq[row["codec"]]) * 1e3
            row["dequantize_min_ms"] = min(td[row["codec"]]) * 1e3
            row["reps"] = len(tq[row["codec"]])
    by_name = {r["codec"]: r for r in rows}
    for row in rows:
        base = by_name.get(row["baseline"])
        if base is None:
            row["vs_baseline"] = None
            continue
        keys = ["bytes_per_param", "rel_fro_err", "matmul_rel_err"] + (["quantize_ms", "dequantize_ms"] if timing else [])
        row["vs_baseline"] = {k: row[k] / base[k] if base[k] else None for k in keys}
    return rows


# ----------------------------------------------------------------------------- optimizers


class CodecAdamW(fmq.QuantizedAdamW):
    """:class:`flux.methods.fmq.QuantizedAdamW` (moments as FMQ stores them: ``flux.ops.quantize``
    at ``moment_bits``/``group_size``, ``exp_avg`` and ``sqrt(exp_avg_sq)``) with the weights
    stored by ``weights``: ``"fp32"`` (a float master copy: an 8-bit-moment optimizer for tuned
    experts), ``"int4"`` (FMQ itself; the test checks it bit for bit), or ``"nf4"`` / ``"fp4"``
    (bitsandbytes codes, block ``group_size``, with :func:`flux.quant_bnb.stochastic_quantize`)."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, weights: str, moment_bits: int = 8,
                 generator: torch.Generator, weight_decay: float = 0.0, group_size: int = fmq.GROUP_SIZE) -> None:
        if weights not in ("fp32", "int4", "nf4", "fp4"):
            raise ValueError(f"weights must be fp32, int4, nf4 or fp4, got {weights!r}")
        self.weights_kind = weights  # read by _nearest while the base class builds the state
        super().__init__(params, lr=lr, moment_bits=moment_bits, generator=generator,
                         weight_decay=weight_decay, group_size=group_size)

    def _nearest(self, w: Tensor):
        if self.weights_kind == "fp32":
            return w.float().clone()
        if self.weights_kind == "int4":
            return super()._nearest(w)
        return quant_bnb.quantize_frozen(w, self.weights_kind, self.group_size)

    def _stochastic(self, w: Tensor):
        if self.weights_kind == "fp32":
            return w
        if self.weights_kind == "int4":
            return super()._stochastic(w)
        return quant_bnb.stochastic_quantize(w, self.weights_kind, self.group_size, self.generator)

    def _master(self, i: int) -> Tensor:
        stored = self.weights[i]
        return stored.clone() if isinstance(stored, Tensor) else super()._master(i)

    @torch.no_grad()
    def _load(self) -> None:
        for p, q in zip(self.params, self.weights):
            p.copy_(q if isinstance(q, Tensor) else q.dequantize(p.dtype))

    def weight_bytes(self) -> int:
        return sum(q.numel() * q.element_size() if isinstance(q, Tensor) else q.nbytes for q in self.weights)

    def state_bytes(self) -> int:
        return sum(q.nbytes for q in (*self.exp_avg, *self.exp_avg_sqrt))


def expert_forward(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """SwiGLU expert: silu(x Wg^T) * (x Wu^T) then Wd."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (TF.silu(gate) * up) @ down.T


def _state_storage_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors, each storage once (bitsandbytes shares its two
    8-bit code books between parameters)."""
    seen, total = set(), 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, Tensor) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
    return total


OPTIMIZERS = ("torch-adamw", "bnb-adamw8bit", "flux-int8-moments", "fmq", "fmq-nf4", "fmq-fp4")
OPT_DESCRIPTION = {
    "torch-adamw": ("fp32", "fp32"),
    "bnb-adamw8bit": ("fp32", "bnb dynamic 8-bit, block 256"),
    "flux-int8-moments": ("fp32", "flux int8 g64 (m, sqrt v)"),
    "fmq": ("flux int4 g64, stochastic rounding", "flux int8 g64 (m, sqrt v)"),
    "fmq-nf4": ("bnb nf4 b64, stochastic rounding", "flux int8 g64 (m, sqrt v)"),
    "fmq-fp4": ("bnb fp4 b64, stochastic rounding", "flux int8 g64 (m, sqrt v)"),
}


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, seed: int):
    """-> (optimizer, weight_bytes(), state_bytes())."""
    gen = torch.Generator().manual_seed(seed)
    if name == "torch-adamw":
        opt = torch.optim.AdamW(params, lr=lr, betas=fmq.ADAM_BETAS, eps=fmq.ADAM_EPS, weight_decay=0.0)
        return opt, lambda: sum(p.numel() * p.element_size() for p in params), lambda: _state_storage_bytes(opt)
    if name == "bnb-adamw8bit":
        opt = quant_bnb.adamw8bit(params, lr=lr, betas=fmq.ADAM_BETAS, eps=fmq.ADAM_EPS, weight_decay=0.0)
        return opt, lambda: sum(p.numel() * p.element_size() for p in params), lambda: _state_storage_bytes(opt)
    if name == "fmq":
        opt = fmq.QuantizedAdamW(params, lr=lr, moment_bits=8, generator=gen)
        return opt, lambda: sum(q.nbytes for q in opt.weights), \
            lambda: sum(q.nbytes for q in (*opt.exp_avg, *opt.exp_avg_sqrt))
    weights = {"flux-int8-moments": "fp32", "fmq-nf4": "nf4", "fmq-fp4": "fp4"}[name]
    opt = CodecAdamW(params, lr=lr, weights=weights, generator=gen)
    return opt, opt.weight_bytes, opt.state_bytes


def optimizer_cases(names: list[str], hidden: int, inter: int, *, steps: int, batch: int, lr: float,
                    seed: int) -> list[dict]:
    """Train one expert with each optimizer of ``names`` in lock step: every step draws one
    batch and every optimizer takes its step on it before the next, so the inputs are identical
    and background load hits all step times alike."""
    w0 = expert_tensors(hidden, inter, seed)
    g = torch.Generator().manual_seed(seed + 100)
    target = {k: v + torch.randn(v.shape, generator=g) * DELTA_STD for k, v in w0.items()}
    x_eval = torch.randn(4 * batch, hidden, generator=torch.Generator().manual_seed(seed + 200))
    with torch.no_grad():
        y_eval = expert_forward(x_eval, target["gate_up"], target["down"])
    scale = float(y_eval.square().mean())

    def eval_loss(params) -> float:
        with torch.no_grad():
            return float(TF.mse_loss(expert_forward(x_eval, *params), y_eval)) / scale

    def distance(params) -> float:  # ||W - W*|| / ||delta|| over both tensors
        num = sum(float((p.detach() - target[k]).square().sum()) for p, k in zip(params, ("gate_up", "down")))
        den = sum(float((target[k] - w0[k]).square().sum()) for k in ("gate_up", "down"))
        return math.sqrt(num / den)

    runs = []
    for name in names:
        params = [torch.nn.Parameter(w0["gate_up"].clone()), torch.nn.Parameter(w0["down"].clone())]
        initial = eval_loss(params)
        opt, weight_bytes, state_bytes = make_optimizer(name, params, lr, seed + 300)
        # after the optimizer stored the weights (quantized ones round W0)
        runs.append(dict(name=name, params=params, opt=opt, weight_bytes=weight_bytes, state_bytes=state_bytes,
                         initial=initial, start=eval_loss(params), start_distance=distance(params),
                         step_s=[], losses=[]))
    data = torch.Generator().manual_seed(seed + 400)
    for _ in range(steps):
        x = torch.randn(batch, hidden, generator=data)
        with torch.no_grad():
            y = expert_forward(x, target["gate_up"], target["down"])
        for run in runs:
            loss = TF.mse_loss(expert_forward(x, *run["params"]), y) / scale
            loss.backward()
            t0 = time.perf_counter()
            run["opt"].step()
            run["step_s"].append(time.perf_counter() - t0)
            if isinstance(run["opt"], torch.optim.Optimizer):
                run["opt"].zero_grad(set_to_none=True)
            run["losses"].append(loss.item())
    rows = []
    for run in runs:
        params, n = run["params"], sum(p.numel() for p in run["params"])
        wb, sb = run["weight_bytes"](), run["state_bytes"]()
        weights, moments = OPT_DESCRIPTION[run["name"]]
        rows.append({
            "optimizer": run["name"], "weights": weights, "moments": moments, "params": n,
            "weight_bytes": wb, "state_bytes": sb, "weight_bytes_per_param": wb / n, "state_bytes_per_param": sb / n,
            "stored_bytes_per_param": (wb + sb) / n,
            "step_ms_median": statistics.median(run["step_s"][1:] or run["step_s"]) * 1e3 if steps else None,
            "loss_at_w0": run["initial"], "loss_at_start": run["start"], "final_loss": eval_loss(params),
            "final_train_loss_mean_last10": statistics.fmean(run["losses"][-10:]) if steps else None,
            "distance_at_start": run["start_distance"], "final_distance": distance(params),
        })
    return rows


def optimizer_case(name: str, hidden: int, inter: int, *, steps: int, batch: int, lr: float, seed: int) -> dict:
    return optimizer_cases([name], hidden, inter, steps=steps, batch=batch, lr=lr, seed=seed)[0]


# ----------------------------------------------------------------------------- report


def _git(*argv: str) -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import platform

    import flux

    bnb_version = None
    try:
        quant_bnb.bnb_functional()
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        pass
    return {
        "machine": {
            "device": "cpu",
            "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
        },
        "versions": {
            "python": sys.version.split()[0], "torch": torch.__version__, "bitsandbytes": bnb_version,
            "flux": getattr(flux, "__version__", None), "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": None if (st := _git("status", "--porcelain", "--untracked-files=no")) is None else bool(st),
        },
    }


def run(*, shapes: list[str], quick: bool = False, budget_s: float = 1.0, min_reps: int = 9, max_reps: int = 50,
        steps: int = 300, batch: int = 64, lr: float = ADAM_LR, seed: int = 0, timing: bool = True,
        optimizers: Optional[list[str]] = None, opt_shape: Optional[str] = None,
        distributions: Optional[list[str]] = None) -> dict:
    """The whole comparison as a JSON-able dict (the CLI writes it; the test runs it small)."""
    quant_bnb.bnb_functional()  # fail early with the install line
    cods = codecs(quick)
    dists = list(distributions or DISTRIBUTIONS)
    unknown = [d for d in dists if d not in DISTRIBUTIONS]
    if unknown:
        raise ValueError(f"unknown distributions {unknown}; known: {list(DISTRIBUTIONS)}")
    report = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **environment(),
        "settings": {
            "quick": quick, "budget_s": budget_s, "min_reps": min_reps, "max_reps": max_reps, "seed": seed,
            "weights": {"distributions": {d: {"std": WEIGHT_STD, "outlier_fraction": DISTRIBUTIONS[d],
                                              "outlier_sigmas": list(OUTLIER_SIGMAS)} for d in dists},
                        "dtype": "float32", "timed": dists[0]},
            "matmul_tokens": TOKENS,
        },
        "shapes": {},
        "storage": [],
    }
    for i, name in enumerate(shapes):
        hidden, inter = shape_dims(name)
        for j, dist in enumerate(dists):
            tensors = expert_tensors(hidden, inter, seed + 10 * i, outlier_fraction=DISTRIBUTIONS[dist])
            report["shapes"][name] = {"hidden": hidden, "inter": inter,
                                      "tensors": {k: list(v.shape) for k, v in tensors.items()}}
            for tname, w in tensors.items():
                report["storage"] += storage_case(name, tname, w, cods, budget_s=budget_s, min_reps=min_reps,
                                                  max_reps=max_reps, seed=seed + 1000 + i,
                                                  timing=timing and j == 0, distribution=dist)
    opt_shape = opt_shape or shapes[0]
    hidden, inter = shape_dims(opt_shape)
    names = list(OPTIMIZERS) if optimizers is None else optimizers
    report["optimizer"] = {
        "shape": {"name": opt_shape, "hidden": hidden, "inter": inter},
        "steps": steps, "batch": batch, "lr": lr, "betas": list(fmq.ADAM_BETAS), "eps": fmq.ADAM_EPS,
        "weight_decay": 0.0, "delta_std": DELTA_STD,
        "loss": "MSE(student(x), teacher(x)) / mean(teacher(x)^2) on 4*batch held-out inputs",
        "timing": "median optimizer.step() over the steps after the first; the optimizers run in lock step",
        "rows": optimizer_cases(names, hidden, inter, steps=steps, batch=batch, lr=lr, seed=seed + 7) if names else [],
    }
    return report


def _f(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(report: dict) -> str:
    """Markdown tables of a report (what docs/bitsandbytes.md shows)."""
    m, v = report["machine"], report["versions"]
    lines = [f"{m['cpu_model']} ({m['cpu_capability']}), torch threads {m['torch_threads']}, "
             f"OMP_NUM_THREADS={m['omp_num_threads_env']}, load {m['load_avg_1m']:.1f}; torch {v['torch']}, "
             f"bitsandbytes {v['bitsandbytes']}", ""]
    timed_dist = report["settings"]["weights"]["timed"]
    timed = [r for r in report["storage"] if r["distribution"] == timed_dist]
    has_times = any("quantize_ms" in r for r in timed)
    lines += [f"Weights: {timed_dist}; times are medians, (x flux) = the ratio to the flux codec of the same "
              "bits and group, measured in the same run.", ""]
    head = "| shape | tensor | codec | B/param | rel. Frobenius err | matmul rel. err |"
    sep = "| --- | --- | --- | --- | --- | --- |"
    if has_times:
        head += " quantize ms (x flux) | dequantize ms (x flux) |"
        sep += " --- | --- |"
    lines += [head, sep]
    for r in timed:
        dims = "x".join(map(str, r["dims"]))
        cells = [r["shape"], f"{r['tensor']} [{dims}]", r["codec"], f"{r['bytes_per_param']:.4f}",
                 f"{r['rel_fro_err']:.4f}", f"{r['matmul_rel_err']:.4f}"]
        if has_times:
            vb = r["vs_baseline"] or {}
            for k in ("quantize_ms", "dequantize_ms"):
                ratio = "" if r["library"] == "flux" else f" ({_f(vb.get(k), '.2f')}x)"
                cells.append(f"{r[k]:.3f}{ratio}")
        lines.append("| " + " | ".join(cells) + " |")
    others = sorted({r["distribution"] for r in report["storage"]} - {timed_dist})
    for dist in others:
        rows = [r for r in report["storage"] if r["distribution"] == dist]
        tensors = list(dict.fromkeys((r["shape"], r["tensor"]) for r in rows))
        lines += ["", f"Weights: {dist} (relative Frobenius error; B/param as above)", "",
                  "| codec | " + " | ".join(f"{s} {t}" for s, t in tensors) + " |",
                  "| --- |" + " --- |" * len(tensors)]
        for codec in dict.fromkeys(r["codec"] for r in rows):
            errs = {(r["shape"], r["tensor"]): r["rel_fro_err"] for r in rows if r["codec"] == codec}
            lines.append(f"| {codec} | " + " | ".join(f"{errs[k]:.4f}" for k in tensors) + " |")
    o = report["optimizer"]
    if o["rows"]:
        lines += ["", f"Optimizer: one expert H={o['shape']['hidden']} I={o['shape']['inter']}, {o['steps']} steps, "
                  f"batch {o['batch']}, lr {o['lr']}; loss = {o['loss']}", "",
                  "| optimizer | weights | moments | weight B/param | state B/param | step ms | loss at start | "
                  "final loss | final dist. to target |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in o["rows"]:
            lines.append(f"| {r['optimizer']} | {r['weights']} | {r['moments']} | {r['weight_bytes_per_param']:.4f} | "
                         f"{r['state_bytes_per_param']:.4f} | {r['step_ms_median']:.2f} | {r['loss_at_start']:.2e} | "
                         f"{r['final_loss']:.2e} | {r['final_distance']:.3f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bnb_compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bnb-cpu.json"), help="JSON path")
    ap.add_argument("--md", type=Path, default=None, help="also write the markdown tables here")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {list(SHAPES)} or HxI")
    ap.add_argument("--quick", action="store_true", help="mixtral-base only, group/block 64 only, 60 steps")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per timed case (all codecs together)")
    ap.add_argument("--min-reps", type=int, default=9, help="timed rounds at least (medians of a loaded machine)")
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=ADAM_LR)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated; '' skips the part")
    ap.add_argument("--distributions", default=",".join(DISTRIBUTIONS),
                    help=f"weight distributions of the storage part, of {list(DISTRIBUTIONS)} (the first is timed)")
    ap.add_argument("--opt-shape", default=None, help="a SHAPES name or HxI (default: the first shape)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (set OMP_NUM_THREADS too)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.steps = "mixtral-base", min(args.steps, 60)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not quant_bnb.available():
        print(quant_bnb.INSTALL_HINT, file=sys.stderr)
        return 2
    shapes = [s for s in args.shapes.split(",") if s]
    try:
        for s in shapes + ([args.opt_shape] if args.opt_shape else []):
            shape_dims(s)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    bad = [o for o in args.optimizers.split(",") if o and o not in OPTIMIZERS]
    if bad:
        print(f"unknown optimizers {bad}; known: {list(OPTIMIZERS)}", file=sys.stderr)
        return 2
    dists = [d for d in args.distributions.split(",") if d]
    if not dists or any(d not in DISTRIBUTIONS for d in dists):
        print(f"--distributions: one or more of {list(DISTRIBUTIONS)}, got {args.distributions!r}", file=sys.stderr)
        return 2
    report = run(shapes=shapes, quick=args.quick, budget_s=args.budget, min_reps=args.min_reps,
                 max_reps=args.max_reps, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                 optimizers=[o for o in args.optimizers.split(",") if o], opt_shape=args.opt_shape,
                 distributions=dists)
    table = render(report)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        args.md.write_text(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
