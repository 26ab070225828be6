"""Run the kernel microbenchmarks and write the result table and JSON.

    python -m benchmarks.run [--device cpu|cuda] [--dtype fp32|bf16] [--quick] [--out DIR]

Prints a markdown table (shape, routing, pass, provider, median ms, GFLOP/s or GB/s, ratios to
the baselines measured in the same run) and writes DIR/kernels-<device>.json (machine,
versions, shapes, every timing and ratio, the performance targets) and DIR/kernels-<device>.md.

``--quick`` runs only the performance-target cases (CPU: merged_moe fwd+bwd at olmoe-cpu, E=64,
k=8, H=512, I=256, T=4096, uniform and FLUX-merged routing, and the int4 route_profile at
(T,H,E,k) = (4096,512,64,8) and (16384,256,128,8)); on CUDA the same cases at full size.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import providers as P
from benchmarks.shapes import (
    GATES,
    MOE_SHAPES,
    PASSES,
    ROUTE_SHAPES,
    ROUTINGS,
    build_moe_case,
    build_route_case,
)
from benchmarks.timing import cpu_model, measure_copy, measure_interleaved, measure_matmul

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
README_BEGIN = "<!-- kernels-cpu-table:begin -->"
README_END = "<!-- kernels-cpu-table:end -->"
README_PLACEHOLDER = "BENCHMARK_TABLE_PLACEHOLDER"

# The performance targets (CPU, fp32): (id, description, how to compute, goal).
CPU_TARGET_SHAPE = "olmoe-cpu"
CPU_ROUTE_TARGETS = ("olmoe-cpu", "router-e128-cpu")


@dataclass
class Group:
    """One case: all providers of it are timed together (interleaved)."""

    kind: str  # "moe" or "route"
    shape: str
    variant: str  # routing (moe) or gate format (route)
    pass_: str  # "fwd" / "fwd+bwd" (route: "fwd")
    providers: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- plan


def plan(args: argparse.Namespace) -> list[Group]:
    device_type = args.device
    size = args.size or ("cpu" if device_type == "cpu" else "full")
    suffix = "-cpu" if size == "cpu" else ""
    moe_all = P.moe_providers(device_type)
    route_all = P.route_providers(device_type)
    groups: list[Group] = []
    if args.quick:
        target = "olmoe" + suffix
        for routing in ("uniform", "merged"):
            groups.append(Group("moe", target, routing, "fwd+bwd", list(moe_all)))
        for shape in ("olmoe" + suffix, "router-e128" + suffix):
            groups.append(Group("route", shape, "int4-g64", "fwd", list(route_all)))
    else:
        for shape in MOE_SHAPES.values():
            if shape.size != size:
                continue
            for routing in ROUTINGS:
                for pass_ in PASSES:
                    groups.append(Group("moe", shape.name, routing, pass_, list(moe_all)))
        for shape in ROUTE_SHAPES.values():
            if shape.size != size:
                continue
            for gate in GATES:
                groups.append(Group("route", shape.name, gate, "fwd", list(route_all)))
    if args.shapes:
        wanted = set(args.shapes.split(","))
        groups = [g for g in groups if g.shape in wanted]
    if args.providers:
        wanted = set(args.providers.split(","))
        for g in groups:
            g.providers = [p for p in g.providers if p in wanted]
    if args.routings:
        wanted = set(args.routings.split(","))
        groups = [g for g in groups if g.kind != "moe" or g.variant in wanted]
    if args.gates:
        wanted = set(args.gates.split(","))
        groups = [g for g in groups if g.kind != "route" or g.variant in wanted]
    if args.passes:
        wanted = set(args.passes.split(","))
        groups = [g for g in groups if g.kind != "moe" or g.pass_ in wanted]
    return [g for g in groups if g.providers]


# ----------------------------------------------------------------------------- environment


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(device: str) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _module_version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:
        return None


def _git(*argv: str) -> str | None:
    try:
        out = subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def versions() -> dict:
    import flux

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "flux": getattr(flux, "__version__", None),
        "transformers": _module_version("transformers"),
        "numpy": _module_version("numpy"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def ceilings(device: str, dtype: torch.dtype) -> dict:
    """Machine ceilings measured now: a large matmul (FLOP/s) and a same-device copy (GB/s)."""
    if device == "cuda":
        return {"matmul": measure_matmul(device, torch.bfloat16 if dtype == torch.float32 else dtype, 8192),
                "copy": measure_copy(device, 1 << 30)}
    return {"matmul": measure_matmul(device, dtype, 2048, reps=5), "copy": measure_copy(device, 256 << 20, reps=5)}


# ----------------------------------------------------------------------------- running


def _check_moe(bench: P.Bench, expected: dict) -> float:
    got = bench.results(bench.fn())
    return max(P.rel_err(got[name], expected[name]) for name in expected)


def _check_route(bench: P.Bench, expected: dict) -> float:
    """Fraction of routed slots whose expert differs from the unfused chain (near-ties may flip)."""
    got = bench.results(bench.fn())
    ids, ref_ids = got["topk_ids"].cpu(), expected["topk_ids"].cpu()
    return float((ids.sort(dim=1).values != ref_ids.sort(dim=1).values).float().mean())


def run_group(group: Group, args: argparse.Namespace, dtype: torch.dtype, log) -> tuple[list[dict], list[dict]]:
    """Time every provider of ``group``; -> (result rows, skipped providers)."""
    device = args.device
    benches: dict[str, P.Bench] = {}
    skipped: list[dict] = []
    checks: dict[str, float] = {}
    info: dict = {}
    if group.kind == "moe":
        case = build_moe_case(MOE_SHAPES[group.shape], group.variant, dtype, device, seed=args.seed)
        info = {"routing_stats": case.routing.stats}
        for name in group.providers:
            try:
                benches[name] = P.build_moe(name, case, group.pass_)
            except P.Skip as why:
                skipped.append({"provider": name, "reason": str(why)})
        if args.check and any(n.startswith("flux:") for n in benches):
            expected = P.moe_expected(case, group.pass_)
            for name in [n for n in benches if n.startswith("flux:")]:
                try:
                    checks[name] = _check_moe(benches[name], expected)
                except Exception as exc:  # the timing below reports the error
                    log(f"    check of {name} failed: {type(exc).__name__}: {exc}")
    else:
        case = build_route_case(ROUTE_SHAPES[group.shape], group.variant, dtype, device, seed=args.seed)
        for name in group.providers:
            try:
                benches[name] = P.build_route(name, case)
            except P.Skip as why:
                skipped.append({"provider": name, "reason": str(why)})
        if args.check and "unfused" in benches:
            ref = benches["unfused"]
            expected = ref.results(ref.fn())
            for name in [n for n in benches if n.startswith("flux:")]:
                try:
                    checks[name] = _check_route(benches[name], expected)
                except Exception as exc:
                    log(f"    check of {name} failed: {type(exc).__name__}: {exc}")
    expected = None  # free the fp32 expectation before timing (GBs at full size)
    timings = measure_interleaved(
        {name: b.fn for name, b in benches.items()}, device,
        warmup=args.warmup, min_reps=args.min_reps, max_reps=args.max_reps, budget_s=args.budget,
    )
    rows = []
    for name, timing in timings.items():
        bench = benches[name]
        row = {
            "kind": group.kind, "shape": group.shape,
            ("routing" if group.kind == "moe" else "gate"): group.variant,
            "pass": group.pass_, "provider": name, **timing.as_dict(),
            "flops": bench.flops, "bytes": bench.bytes, **info,
        }
        if timing.trace:
            log(timing.trace)
        median = timing.median_s
        if bench.flops and math.isfinite(median):
            row["gflops"] = bench.flops / median / 1e9
        if bench.bytes and math.isfinite(median):
            row["gbps"] = bench.bytes / median / 1e9
        if name in checks:
            row["check"] = checks[name]
        rows.append(row)
    by_name = {r["provider"]: r for r in rows}

    def time_of(name: str, stat: str) -> float:
        r = by_name.get(name)
        return r[stat] if r and not r.get("error") and r["reps"] else float("nan")

    # Ratios of medians (reported), and of minimum times (less sensitive to background load).
    for stat, suffix in (("median_ms", ""), ("min_ms", "_min")):
        for row in rows:
            t = row[stat]
            if group.kind == "moe":
                row["vs_grouped_mm" + suffix] = time_of("grouped_mm", stat) / t  # speedup (> 1: faster)
                row["vs_floor" + suffix] = t / time_of("floor", stat)  # slowdown (1.0: at the floor)
            else:
                row["vs_unfused" + suffix] = time_of("unfused", stat) / t  # speedup
    del case, benches
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows, skipped


# ----------------------------------------------------------------------------- targets


def _cpu_targets() -> list[tuple]:
    """(description, kind, shape, routing or gate, pass, ratio key, comparison, goal)."""
    targets = [
        ("merged_moe fwd+bwd E=64 k=8 H=512 I=256 T=4096 (uniform): speedup of flux:cpp over grouped_mm",
         "moe", CPU_TARGET_SHAPE, "uniform", "fwd+bwd", "vs_grouped_mm", ">=", 1.25),
        ("same case: flux:cpp time / dense-matmul floor time",
         "moe", CPU_TARGET_SHAPE, "uniform", "fwd+bwd", "vs_floor", "<=", 1.3),
        ("FLUX setting (16 trainable + 4 frozen groups): speedup of flux:cpp over unmerged grouped_mm",
         "moe", CPU_TARGET_SHAPE, "merged", "fwd+bwd", "vs_grouped_mm", ">=", 2.0),
    ]
    for shape in CPU_ROUTE_TARGETS:
        s = ROUTE_SHAPES[shape]
        targets.append((f"route_profile int4 g64 (T,H,E,k)=({s.T},{s.H},{s.E},{s.k}): speedup of flux:cpp over the unfused chain",
                        "route", shape, "int4-g64", "fwd", "vs_unfused", ">=", 1.8))
    return targets


def evaluate_targets(rows: list[dict], device: str) -> list[dict]:
    """The CPU performance targets, as ratios from this run (flux:cpp); ok None = not measured."""
    if device != "cpu":
        return []
    out = []
    for description, kind, shape, variant, pass_, key, op, goal in _cpu_targets():
        row = next((r for r in rows
                    if (r["kind"], r["shape"], r.get("routing" if kind == "moe" else "gate"), r["pass"], r["provider"])
                    == (kind, shape, variant, pass_, "flux:cpp") and not r.get("error") and r["reps"]), None)
        value = row.get(key) if row else None
        if value is None or not math.isfinite(value):
            ok = None
        else:
            ok = value >= goal if op == ">=" else value <= goal
        out.append({"target": description, "goal": f"{op} {goal:g}", "value": value, "ok": ok,
                    "value_from_min_times": row.get(key + "_min") if row else None})
    return out


# ----------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return f"{x:{spec}}{suffix}"


def _flops_text(g: float) -> str:
    return f"{g / 1e3:.1f} TFLOP/s" if g >= 1e4 else f"{g:.1f} GFLOP/s"


def _rate(row: dict) -> str:
    """MoE rows: GFLOP/s.  Router rows: GB/s (it is judged by bytes moved), with the gate
    matmul's GFLOP/s beside it (on CPU a router with E >= 64 is compute-bound)."""
    if row["kind"] == "route" and row.get("gbps") is not None:
        text = f"{row['gbps']:.2f} GB/s"
        return text + (f" ({_flops_text(row['gflops'])})" if row.get("gflops") is not None else "")
    if row.get("gflops") is not None:
        return _flops_text(row["gflops"])
    return ""


def markdown_table(rows: list[dict], ceil: dict | None, device: str) -> str:
    peak_col = device == "cuda" and ceil is not None
    head = ["shape", "routing / gate", "pass", "provider", "median ms", "GFLOP/s or GB/s",
            "x vs grouped_mm", "x floor", "x vs unfused"]
    if peak_col:
        head.append("% of ceiling")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        variant = r.get("routing") or r.get("gate")
        provider = f"**{r['provider']}**" if r["provider"].startswith("flux:") else r["provider"]
        if r.get("error"):
            cells = [r["shape"], variant, r["pass"], provider, "error: " + r["error"][:80], "", "", "", ""]
            if peak_col:
                cells.append("")
        else:
            note = ""
            tol = 1e-3 if r.get("dtype", "float32") == "float32" else 3e-2
            if r.get("check") is not None and r["kind"] == "moe" and r["check"] > tol:
                note = f" (MISMATCH rel err {r['check']:.1e})"
            if r.get("check") is not None and r["kind"] == "route" and r["check"] > 1e-3:
                note = f" (MISMATCH {r['check']:.1%} ids)"
            cells = [r["shape"], variant, r["pass"], provider + note, _fmt(r["median_ms"], ".1f" if r["median_ms"] >= 10 else ".2f"),
                     _rate(r), _fmt(r.get("vs_grouped_mm"), ".2f", "x"), _fmt(r.get("vs_floor"), ".2f", "x"),
                     _fmt(r.get("vs_unfused"), ".2f", "x")]
            if peak_col:
                if r["kind"] == "moe" and r.get("gflops") is not None:
                    cells.append(_fmt(100 * r["gflops"] / ceil["matmul"]["gflops"], ".0f", "% of matmul"))
                elif r["kind"] == "route" and r.get("gbps") is not None:
                    cells.append(_fmt(100 * r["gbps"] / ceil["copy"]["gbps"], ".0f", "% of copy"))
                else:
                    cells.append("")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def render(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    device = report["device"]
    out = [
        f"Kernel microbenchmarks: {device}, {report['dtype']}, {'quick' if report['quick'] else 'full'} run, "
        f"{report['created']}.",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {v['torch']}, triton {v['triton']}, flux {v['flux']}, python {v['python']}.",
        "",
        markdown_table(report["results"], report.get("ceilings"), device),
        "",
        "median ms: median over the timed rounds (providers of a case interleaved, after warm-up). "
        "GFLOP/s: the FLOPs the layer needs (6*N*H*I forward for N routed (token, expert) pairs; "
        "backward adds 6*N*H*I for the input grads plus 6*N_trainable*H*I for the weight grads) / median time. "
        "GB/s (route_profile): bytes of x + gate + outputs / median time. "
        "x vs grouped_mm / x vs unfused: speedup over that baseline in the same run (> 1 = faster). "
        "x floor: time / time of the dense-matmul floor (same FLOPs as one dense SwiGLU MLP over T*k rows; 1.0 = at the floor). "
        "Baselines run the unmerged layer (all E experts trainable); in the `merged` routing flux runs the FLUX setting "
        "(E/4 tuning experts as trainable groups, the rest merged into E/16 frozen groups).",
    ]
    ceil = report.get("ceilings")
    if ceil:
        out += ["", f"Ceilings measured in this run: {ceil['matmul']['n']}^3 {ceil['matmul']['dtype']} matmul "
                f"{ceil['matmul']['gflops']:.0f} GFLOP/s; same-device copy {ceil['copy']['gbps']:.1f} GB/s (read + write)."]
    if report["targets"]:
        out += ["", "| target (CPU, fp32, flux:cpp) | goal | measured (medians) | met | from min times |",
                "|---|---|---|---|---|"]
        for t in report["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["ok"]]
            out.append(f"| {t['target']} | {t['goal']} | {_fmt(t['value'], '.2f', 'x')} | {met} "
                       f"| {_fmt(t.get('value_from_min_times'), '.2f', 'x')} |")
    if report["skipped"]:
        out += ["", "Not run:"]
        seen = set()
        for s in report["skipped"]:
            key = (s["provider"], s["reason"])
            if key not in seen:
                seen.add(key)
                out.append(f"- {s['provider']}: {s['reason']}")
    return "\n".join(out) + "\n"


def update_readme(path: Path, table_md: str) -> None:
    """Put ``table_md`` into the README between the table markers (or at the placeholder)."""
    text = path.read_text()
    block = f"{README_BEGIN}\n{table_md.rstrip()}\n{README_END}"
    if README_BEGIN in text and README_END in text:
        text = re.sub(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), lambda _: block, text, flags=re.S)
    elif README_PLACEHOLDER in text:
        text = text.replace(README_PLACEHOLDER, block, 1)
    else:
        raise SystemExit(f"{path}: no {README_PLACEHOLDER} or {README_BEGIN} ... {README_END} block to replace")
    path.write_text(text)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--quick", action="store_true", help="only the performance-target cases (a few minutes on 2 cores)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for kernels-<device>.json/.md")
    ap.add_argument("--size", choices=("cpu", "full"), default=None,
                    help="shape size class (default: cpu variants on cpu, full sizes on cuda)")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names to keep")
    ap.add_argument("--routings", default=None, help="comma-separated routings to keep (uniform,skewed,merged)")
    ap.add_argument("--gates", default=None, help="comma-separated router gate formats to keep (int4-g64,int8-g64,dense)")
    ap.add_argument("--passes", default=None, help="comma-separated passes to keep (fwd,fwd+bwd)")
    ap.add_argument("--providers", default=None, help="comma-separated providers to keep, e.g. grouped_mm,floor,flux:cpp")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed calls per case, shared by its providers (default 15 cpu, 5 cuda)")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=None, help="default 30 cpu, 100 cuda")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the correctness check of flux against grouped_mm / the unfused chain")
    ap.add_argument("--no-ceilings", dest="ceilings", action="store_false",
                    help="skip measuring the matmul and copy ceilings")
    ap.add_argument("--readme", default=None, help="also put the table into this README (between the table markers)")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    args.budget = args.budget if args.budget is not None else (15.0 if args.device == "cpu" else 5.0)
    args.max_reps = args.max_reps or (30 if args.device == "cpu" else 100)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from flux.ops.backends import availability

    groups = plan(args)
    log(f"benchmarks: {len(groups)} cases on {args.device} ({args.dtype}), torch threads {torch.get_num_threads()}")
    ceil = ceilings(args.device, dtype) if args.ceilings else None
    if ceil:
        log(f"ceilings: matmul {ceil['matmul']['gflops']:.0f} GFLOP/s, copy {ceil['copy']['gbps']:.1f} GB/s")
    rows: list[dict] = []
    skipped: list[dict] = []
    for i, group in enumerate(groups, 1):
        log(f"[{i}/{len(groups)}] {group.kind} {group.shape} {group.variant} {group.pass_}")
        group_rows, group_skipped = run_group(group, args, dtype, log)
        for r in group_rows:
            r["dtype"] = str(dtype).replace("torch.", "")
            log(f"    {r['provider']:<15} {_fmt(r['median_ms'], '.2f'):>10} ms  {_rate(r):>16}  "
                + (f"x{r['vs_grouped_mm']:.2f} vs grouped_mm  x{r['vs_floor']:.2f} floor" if group.kind == "moe"
                   else f"x{r['vs_unfused']:.2f} vs unfused")
                + (f"  check {r['check']:.1e}" if r.get("check") is not None else "")
                + (f"  ERROR {r['error']}" if r.get("error") else ""))
        rows += group_rows
        skipped += [{"shape": group.shape, "variant": group.variant, "pass": group.pass_, **s} for s in group_skipped]
    report = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "dtype": args.dtype,
        "quick": args.quick,
        "timing": {"warmup": args.warmup, "min_reps": args.min_reps, "max_reps": args.max_reps,
                   "budget_s_per_case": args.budget, "interleaved": True, "statistic": "median"},
        "machine": machine_info(args.device),
        "versions": versions(),
        "flux_backends": availability(),
        "ceilings": ceil,
        "shapes": {g.shape: (MOE_SHAPES[g.shape] if g.kind == "moe" else ROUTE_SHAPES[g.shape]).as_dict() for g in groups},
        "results": rows,
        "skipped": skipped,
        "targets": evaluate_targets(rows, args.device),
    }
    text = render(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels-{args.device}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"kernels-{args.device}.md").write_text(text)
    log(f"wrote {out / f'kernels-{args.device}.json'} and {out / f'kernels-{args.device}.md'}")
    if args.readme:
        update_readme(Path(args.readme), text)
        log(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
