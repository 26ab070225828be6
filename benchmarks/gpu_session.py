"""The Python side of ``scripts/gpu_session.sh``: what its steps measure and report.

    python -m benchmarks.gpu_session info                       # versions and device, as JSON
    python -m benchmarks.gpu_session build-check                # flux._C has its CUDA kernels
    python -m benchmarks.gpu_session ceilings OUT.json          # copy bandwidth, bf16 matmul rate
    python -m benchmarks.gpu_session kernel-timings OUT.json    # timings of the flux_C ops
    python -m benchmarks.gpu_session summary WORK OUT.json FAILED   # session.json and the summary

The correctness checks of the CUDA ops are tests (``tests/ops/test_cuda_ops.py``, marked ``gpu``);
``summary`` reads their JUnit report (``WORK/check.xml``) into ``session.json``'s ``kernel_check``.
Run from the repository root.  torch is imported only inside the commands, so ``info`` and
``summary`` report (not crash) when it is broken.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Callable, Optional


def cuda_median_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median over ``reps`` calls of ``fn`` (ms, CUDA events) after ``warmup`` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


# ----------------------------------------------------------------------------- info / build


def environment_info() -> dict:
    """Python, platform, torch (CUDA build, device properties) and the test/bench packages' versions."""
    info = {"python": sys.version.split()[0], "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["device"] = p.name
            info["capability"] = f"{p.major}.{p.minor}"
            info["sms"] = p.multi_processor_count
            info["memory_gib"] = round(p.total_memory / 2**30, 1)
            info["l2_mib"] = round(getattr(p, "L2_cache_size", 0) / 2**20, 1)
    except Exception as exc:  # report, never stop the session here
        info["torch_error"] = repr(exc)
    for mod in ("triton", "pytest", "pytest_benchmark", "numpy", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:
            info[mod] = f"unavailable ({type(exc).__name__})"
    return info


def build_check() -> None:
    """Raises unless the installed flux._C loads and has its CUDA kernels; prints the backends."""
    import torch  # noqa: F401  (flux._C needs torch loaded first)
    import flux._C  # noqa: F401
    from flux._extension import has_cuda_kernels
    from flux.ops.backends import availability

    print("backends:", availability())
    assert has_cuda_kernels(), "flux._C was built without its CUDA kernels"
    print("flux._C has CUDA kernels")


# ----------------------------------------------------------------------------- measurements


def measure_ceilings() -> dict:
    """The two ceilings of METHOD.md: device-to-device copy (bytes read + written, 1 GiB each way,
    far beyond L2) and an 8192^3 bf16 matmul, on random data, median of 30 after warm-up."""
    import torch

    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), 30, warmup=3)
    copy = {"bytes_each_way": n, "median_ms": round(ms, 4), "GB/s_read+write": round(2 * n / ms / 1e6, 1)}
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = cuda_median_ms(lambda: a @ b, 30, warmup=3)
    mm = {"shape": [m, m, m], "dtype": "bf16", "median_ms": round(ms, 4), "TFLOP/s": round(2 * m**3 / ms / 1e9, 1)}
    return {"copy": copy, "matmul_bf16": mm}


def measure_kernel_timings() -> dict[str, dict]:
    """{case: timing} of the flux_C ops at the tuning notes' shapes (median of 50 after warm-up):
    route_profile (ms, GB/s moved, fp32 TFLOP/s of its logits), moe_routing (ms and the
    reference's), quantize / dequantize of an 8192 x 8192 bf16 matrix."""
    import torch

    import flux._C  # noqa: F401
    from flux.ops.backends import reference as R

    C = torch.ops.flux_C
    dev = "cuda"
    timings: dict[str, dict] = {}

    def timeit(fn, reps=50):
        return cuda_median_ms(fn, reps, warmup=5)

    for T, H, E, k, gk in [(16384, 4096, 64, 8, "int4"), (16384, 4096, 128, 8, "bf16"),
                           (16384, 7168, 256, 8, "int4"), (65536, 2048, 64, 8, "int8")]:
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        cnt = torch.zeros(E, dtype=torch.int64, device=dev)
        if gk == "bf16":
            gargs = (torch.randn(E, H, device=dev, dtype=torch.bfloat16), None, 0, 1)
            gbytes = E * H * 2
        else:
            bits = int(gk[3:])
            qg, sg = C.quantize(torch.randn(E, H, device=dev), bits, 64)
            gargs = (qg, sg, bits, 64)
            gbytes = qg.numel() + sg.numel() * 4
        ms = timeit(lambda: C.route_profile(x, *gargs, k, "softmax", True, cnt))
        nbytes = x.numel() * 2 + gbytes + T * k * 8
        timings[f"route_profile T={T} H={H} E={E} k={k} x=bf16 gate={gk}"] = {
            "ms": round(ms, 4), "GB/s": round(nbytes / ms / 1e6, 1),
            "fp32 TFLOP/s": round(2 * T * H * E / ms / 1e9, 2)}
    for T, k, E, G in [(16384, 8, 64, 40), (131072, 8, 256, 256)]:
        ids = torch.randint(0, E, (T, k), device=dev, dtype=torch.int32)
        e2g = torch.arange(E, device=dev, dtype=torch.int32) % G
        ms = timeit(lambda: C.moe_routing(ids, e2g, G))
        ms_ref = timeit(lambda: R.moe_routing(ids, e2g, G), reps=20)
        timings[f"moe_routing T={T} k={k} E={E} G={G}"] = {"ms": round(ms, 4), "reference_ms": round(ms_ref, 4)}
    for rows, cols in [(8192, 8192)]:
        w = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        for bits in (4, 8):
            ms = timeit(lambda: C.quantize(w, bits, 64))
            q, s = C.quantize(w, bits, 64)
            msd = timeit(lambda: C.dequantize(q, s, bits, 64, cols, torch.bfloat16))
            timings[f"quantize {rows}x{cols} bf16 int{bits} g64"] = {"ms": round(ms, 4)}
            timings[f"dequantize {rows}x{cols} int{bits} g64 -> bf16"] = {"ms": round(msd, 4)}
    return timings


# ----------------------------------------------------------------------------- summary


def junit_cases(path: str) -> Optional[dict]:
    """``{"cases": n, "failures": ["test id: message", ...]}`` of a pytest JUnit report (a
    skipped case counts as a failure: in a GPU session every check must run), None without one."""
    if not os.path.exists(path):
        return None
    cases, failures = 0, []
    for tc in ET.parse(path).getroot().iter("testcase"):
        cases += 1
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None:
                msg = (el.get("message") or el.text or kind).strip().splitlines()
                failures.append(f"{name}: {kind}: {msg[0] if msg else kind}")
    return {"cases": cases, "failures": failures}


def kernel_check(work: str) -> Optional[dict]:
    """``session.json``'s ``kernel_check``: the check tests' cases and failures (``WORK/check.xml``)
    and the kernel timings (``WORK/kernel_timings.json``); None when the check did not run."""
    tests = junit_cases(os.path.join(work, "check.xml"))
    timings = _load(os.path.join(work, "kernel_timings.json"))
    if tests is None and timings is None:
        return None
    return {**(tests or {"cases": 0, "failures": ["check tests: no report"]}), "timings_ms": timings or {}}


def _sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:
        return f"unavailable ({exc})"


def _load(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def session_report(work: str, failed: bool) -> dict:
    """Device, driver, versions, the steps of ``WORK/steps.tsv`` (name, status, rc, seconds), the
    ceilings (``WORK/ceilings.json``), the kernel check and whether every step succeeded."""
    session = {
        "gpu": _sh("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader"),
        "nvcc": _sh("nvcc --version | tail -2 | head -1"),
        "git_commit": _sh("git rev-parse HEAD 2>/dev/null") or "unknown (no .git on this machine)",
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }
    try:
        import torch

        session["torch"] = torch.__version__
        session["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            session.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                           l2_bytes=getattr(p, "L2_cache_size", None), memory_bytes=p.total_memory)
    except Exception as exc:
        session["torch"] = f"unavailable ({exc})"
    try:
        import triton

        session["triton"] = triton.__version__
    except Exception as exc:
        session["triton"] = f"unavailable ({type(exc).__name__})"
    steps = []
    for line in open(os.path.join(work, "steps.tsv")):
        name, status, rc, secs = line.rstrip("\n").split("\t")
        steps.append({"step": name, "status": status, "rc": int(rc), "seconds": int(secs)})
    session["steps"] = steps
    session["ceilings"] = _load(os.path.join(work, "ceilings.json"))
    session["kernel_check"] = kernel_check(work)
    session["ok"] = not failed
    return session


def print_summary(session: dict, out: str) -> None:
    print("\n==================== gpu_session summary ====================")
    print(f"device: {session.get('device')}  driver/gpu: {session['gpu']}  torch {session.get('torch')} "
          f"(cuda {session.get('torch_cuda')})  triton {session.get('triton')}")
    c = session["ceilings"]
    if c:
        print(f"ceilings: copy {c['copy']['GB/s_read+write']} GB/s (read+write), "
              f"bf16 matmul {c['matmul_bf16']['TFLOP/s']} TFLOP/s")
    k = session["kernel_check"]
    if k:
        print(f"kernel check: {k['cases']} cases, {len(k['failures'])} failures")
        for f in k["failures"][:20]:
            print("   ", f)
        for key, val in k["timings_ms"].items():
            print(f"  {key:66s} {val}")
    print(f"{'step':10s} {'status':16s} {'rc':>4s} {'s':>5s}")
    for s in session["steps"]:
        print(f"{s['step']:10s} {s['status']:16s} {s['rc']:4d} {s['seconds']:5d}")
    print("result:", "OK" if session["ok"] else "FAILED", f"(files in {os.path.dirname(out)})")


# ----------------------------------------------------------------------------- CLI


def _write_json(obj, path: str) -> None:
    print(json.dumps(obj, indent=1))
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and device as JSON")
    sub.add_parser("build-check", help="fail unless flux._C has its CUDA kernels")
    for name in ("ceilings", "kernel-timings"):
        sub.add_parser(name).add_argument("out", help="JSON file to write")
    p = sub.add_parser("summary", help="write session.json and print the summary")
    p.add_argument("work", help="the script's work folder (steps.tsv, ceilings.json, check.xml, ...)")
    p.add_argument("out", help="session.json to write")
    p.add_argument("failed", help="1 if any step failed")
    args = ap.parse_args(argv)

    if args.command == "info":
        print(json.dumps(environment_info(), indent=1))
    elif args.command == "build-check":
        build_check()
    elif args.command == "ceilings":
        _write_json(measure_ceilings(), args.out)
    elif args.command == "kernel-timings":
        timings = measure_kernel_timings()
        for key, val in timings.items():
            print(f"{key:70s} {val}")
        with open(args.out, "w") as f:
            json.dump(timings, f, indent=1)
    else:
        session = session_report(args.work, args.failed == "1")
        with open(args.out, "w") as f:
            json.dump(session, f, indent=1)
        print_summary(session, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
