"""Timing (median of N after warm-up, providers interleaved), work counts, and machine ceilings.

Providers of one case are timed *interleaved* (round r runs every provider once), so a change
in background load during the run hits all of them alike and their ratios stay meaningful on a
shared machine.
"""
from __future__ import annotations

import gc
import math
import platform
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # no procfs (macOS, some containers): fall back below
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds taken by one call of ``fn`` (device work included)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    times_s: list[float] = field(default_factory=list)
    error: str | None = None
    trace: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else float("nan")

    @property
    def min_s(self) -> float:
        return min(self.times_s) if self.times_s else float("nan")

    @property
    def iqr_s(self) -> float:
        if len(self.times_s) < 4:
            return float("nan")
        q = statistics.quantiles(self.times_s, n=4)
        return q[2] - q[0]

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median_s * 1e3,
            "min_ms": self.min_s * 1e3,
            "iqr_ms": self.iqr_s * 1e3,
            "reps": len(self.times_s),
            "times_ms": [round(t * 1e3, 4) for t in self.times_s],
            "error": self.error,
        }


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str,
    *,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 30,
    budget_s: float = 5.0,
) -> dict[str, Timing]:
    """Median-of-N timing of several providers of one case, interleaved round by round.

    Each provider runs ``warmup`` untimed calls (a provider that raises is reported with its
    error and dropped).  Each provider then gets an equal share of ``budget_s``: its number of
    timed calls is ``share / (its warm-up time)`` clamped to [min_reps, max_reps], so a slow
    baseline gets few calls and a fast kernel many.  Calls run in rounds (every provider that
    still needs calls runs once per round), so background load hits all providers alike.
    """
    out = {name: Timing() for name in fns}
    live: dict[str, Callable[[], object]] = {}
    first: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            for _ in range(max(1, warmup)):
                first[name] = time_call(fn, device)
            live[name] = fn
        except Exception as exc:  # report, keep benchmarking the others
            out[name].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            out[name].trace = traceback.format_exc()
    if not live:
        return out
    share = budget_s / len(live)
    target = {name: int(min(max_reps, max(min_reps, math.ceil(share / max(first[name], 1e-9))))) for name in live}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for round_ in range(max(target.values())):
            for name, fn in live.items():
                if round_ < target[name]:
                    out[name].times_s.append(time_call(fn, device))
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


# ----------------------------------------------------------------------------- work counts


def moe_flops(pass_: str, pairs: int, trainable_pairs: int, hidden: int, inter: int) -> int:
    """FLOPs a MoE layer has to do.

    Forward: ``2*N*H*2I`` (gate_up) + ``2*N*I*H`` (down) = ``6*N*H*I`` for N (token, expert)
    pairs.  Backward: the same again for the input gradients of all pairs, plus the same again
    for the weight gradients of the pairs whose weights are trainable; with every weight
    trainable, fwd+bwd = 3x forward.  Element-wise work (activation, gathers) is not counted.
    """
    fwd = 6 * pairs * hidden * inter
    if pass_ == "fwd":
        return fwd
    return fwd + 6 * pairs * hidden * inter + 6 * trainable_pairs * hidden * inter


def route_bytes(tokens: int, hidden: int, experts: int, k: int, x_elt: int, gate_bytes: int) -> int:
    """Bytes a router must move: read x and the gate once, write weights, ids and counts."""
    return tokens * hidden * x_elt + gate_bytes + tokens * k * (4 + 4) + experts * 8


# ----------------------------------------------------------------------------- ceilings


def measure_matmul(device: torch.device | str, dtype: torch.dtype, n: int, reps: int = 5) -> dict:
    """Achieved FLOP/s of one n x n x n matmul (median of ``reps``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = measure_interleaved({"mm": lambda: a @ b}, device, warmup=2, min_reps=reps, max_reps=reps, budget_s=0)
    median = timing["mm"].median_s
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_ms": median * 1e3,
            "gflops": 2 * n**3 / median / 1e9}


def measure_copy(device: torch.device | str, nbytes: int, reps: int = 10) -> dict:
    """Achieved bandwidth of a same-device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    timing = measure_interleaved({"copy": lambda: dst.copy_(src)}, device, warmup=2, min_reps=reps,
                                 max_reps=reps, budget_s=0)
    median = timing["copy"].median_s
    return {"bytes": nbytes, "median_ms": median * 1e3, "gbps": 2 * nbytes / median / 1e9}
