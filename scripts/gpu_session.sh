#!/usr/bin/env bash
# One call on a GPU machine (H100/H200 with a CUDA build of torch preinstalled, no internet):
# versions, build of flux._C with the CUDA kernels, a direct check of the CUDA ops against the
# reference, the two ceilings (device copy bandwidth, bf16 matmul rate), the gpu-marked tests,
# the kernel benchmarks and the whole test suite on the GPU.  Everything lands under $OUT:
#
#   session.json   device, driver, versions, ceilings, kernel-check results and timings, and
#                  the status/seconds of every step
#   session.log    the full output of every step
#   bench/         benchmarks.run's kernels-cuda.json / .md (when benchmarks/run.py exists)
#
# Usage:  scripts/gpu_session.sh [STEP ...]      (default: all steps below, in this order)
#   info build check ceilings test_gpu bench test_all      and, opt-in: sanitize
# A failed step does not stop the others (steps that need the build are skipped when it failed);
# the exit status is non-zero if any step failed or was skipped for lack of time.
#
# Knobs: OUT (default ./gpu_out), PYTHON (default python3), FLUX_GPU_BUDGET_S (wall-clock budget
# of the whole script, default 570: the device tool stops a command at 600 s),
# TORCH_CUDA_ARCH_LIST (default 9.0a), FLUX_BENCH_ARGS (default --quick), MAX_JOBS.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/session.log
: >"$LOG"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
BUDGET=${FLUX_GPU_BUDGET_S:-570}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
export PYTHONUNBUFFERED=1
export FLUX_REQUIRE_EXTENSION=1
BENCH_ARGS=${FLUX_BENCH_ARGS:---quick}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS_TSV=$WORK/steps.tsv
: >"$STEPS_TSV"
T0=$(date +%s)
BUILD_OK=0
ANY_FAILED=0

if [ $# -gt 0 ]; then
  STEPS=("$@")
else
  STEPS=(info build check ceilings test_gpu bench test_all)
fi

say() { echo "$*" | tee -a "$LOG"; }

# run_step NAME LIMIT_S FUNCTION: runs the step function (exported, in a child bash so that
# `timeout` can stop it and everything it started) under a time limit clipped to what is left of
# the budget; its output goes to the terminal and to session.log; the status is recorded for
# session.json.
run_step() {
  local name=$1 limit=$2 fn=$3
  local now left
  now=$(date +%s)
  left=$((BUDGET - (now - T0) - 15))
  if [ "$left" -lt 20 ]; then
    say "=== $name: SKIPPED (out of time budget)"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped-budget" "-1" "0" >>"$STEPS_TSV"
    ANY_FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local start rc status
  start=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" bash -c "$fn" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  local secs=$(($(date +%s) - start))
  say "=== $name: $status (rc=$rc, ${secs}s)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" >>"$STEPS_TSV"
  [ "$rc" -ne 0 ] && ANY_FAILED=1
  return "$rc"
}

skip_step() {  # NAME REASON
  say "=== $1: SKIPPED ($2)"
  printf '%s\t%s\t%s\t%s\n' "$1" "skipped: $2" "-1" "0" >>"$STEPS_TSV"
  ANY_FAILED=1
}

# ------------------------------------------------------------------------------------ steps
step_info() {
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
    --format=csv || true
  nvcc --version || echo "nvcc not on PATH"
  cmake --version | head -1 || true
  "$PY" - <<'EOF'
import json, platform, sys
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
print(json.dumps(info, indent=1))
EOF
}

step_build() {
  # --no-deps: the machine's torch is whatever its image holds (the project pins the CPU wheel's
  # version) and there is no index to resolve against; --no-build-isolation: build against it.
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
    echo "torch here is not a CUDA build: the CUDA kernels would not be compiled" >&2
    return 1
  fi
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
  "$PY" - <<'EOF'
import torch
import flux._C  # noqa: F401
from flux._extension import has_cuda_kernels
from flux.ops.backends import availability
print("backends:", availability())
assert has_cuda_kernels(), "flux._C was built without its CUDA kernels"
print("flux._C has CUDA kernels")
EOF
}

step_check() {
  "$PY" - "$WORK/check.json" <<'EOF'
# Direct check of torch.ops.flux_C on CUDA tensors against the reference (on CPU, in fp64 where
# the op computes), with fresh random inputs, outputs compared exactly where the contract is
# exact; then CUDA-graph capture of the routing ops and a few timings for the tuning work.
import json, math, sys, time
import torch
import flux._C  # noqa: F401
from flux.ops.backends import reference as R

C = torch.ops.flux_C
dev = "cuda"
gen = torch.Generator().manual_seed(1234)
results = {"failures": [], "cases": 0, "timings_ms": {}}


def fail(name, msg):
    results["failures"].append(f"{name}: {msg}")
    print("FAIL", name, msg)


def case():
    results["cases"] += 1


# ---- quantize / dequantize: bit-exact with the reference on CPU
for bits in (4, 8):
    for rows, cols, gs in [(1, 1, 1), (7, 97, 16), (33, 130, 64), (5, 64, 3), (3, 5, 7), (64, 4096, 128)]:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            w = torch.randn(rows, cols, generator=gen).to(dt)
            w[0, : min(gs, cols)] = 0
            name = f"quantize bits={bits} {rows}x{cols} gs={gs} {dt}"
            case()
            q, s = C.quantize(w.to(dev), bits, gs)
            qr, sr = R.quantize(w, bits, gs)
            if not (torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)):
                fail(name, f"qdata mismatches {(q.cpu() != qr).sum().item()}, scales max diff "
                     f"{(s.cpu() - sr).abs().max().item() if s.numel() else 0}")
            for out_dt in (torch.float32, dt, torch.float64):
                d = C.dequantize(q, s, bits, gs, cols, out_dt)
                dr = R.dequantize(qr, sr, bits, gs, cols, out_dt)
                if not torch.equal(d.cpu(), dr):
                    fail(name + f" dequantize->{out_dt}", "mismatch")

# ---- route_profile against fp64 logits
def route_case(T, H, E, k, xdt, gate_kind, scoring, renorm, gs=32):
    name = f"route_profile T={T} H={H} E={E} k={k} x={xdt} gate={gate_kind} {scoring} renorm={renorm}"
    case()
    x = torch.randn(T, H, generator=gen).to(xdt)
    dense = torch.randn(E, H, generator=gen) / H**0.5
    if gate_kind.startswith("int"):
        bits = int(gate_kind[3:])
        qg, sg = R.quantize(dense, bits, gs)
        w = R.dequantize(qg, sg, bits, gs, H, torch.float32)
        args = (qg.to(dev), sg.to(dev), bits, gs)
    else:
        gdt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[gate_kind]
        g = dense.to(gdt)
        w = g.float()
        args = (g.to(dev), None, 0, 1)
    counts0 = torch.randint(0, 5, (E,), generator=gen)
    counts = counts0.clone().to(dev)
    weights, ids = C.route_profile(x.to(dev), *args, k, scoring, renorm, counts)
    torch.cuda.synchronize()
    weights, ids, counts = weights.cpu(), ids.cpu(), counts.cpu()
    logits = x.double() @ w.double().t()
    if T:
        best = logits.sort(dim=-1, descending=True).values[:, :k]
        chosen = logits.gather(1, ids.long().clamp(0, E - 1))
        if ids.min() < 0 or ids.max() >= E:
            return fail(name, "ids out of range")
        if (chosen - best).abs().max() > 1e-4:
            return fail(name, f"chosen logits off by {(chosen - best).abs().max().item():.3g}")
        if k > 1 and (ids.long().unsqueeze(2) == ids.long().unsqueeze(1)).sum() != T * k:
            return fail(name, "duplicate ids in a row")
        scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
        expect = scores.gather(1, ids.long())
        if renorm:
            expect = expect / expect.sum(-1, keepdim=True)
        err = (weights.double() - expect).abs().max().item()
        if err > 1e-4:
            return fail(name, f"weights off by {err:.3g}")
    hist = torch.bincount(ids.flatten().long(), minlength=E)
    if not torch.equal(counts - counts0, hist):
        fail(name, "counts mismatch")


for E, k in [(1, 1), (6, 4), (7, 2), (8, 8), (9, 3), (13, 13), (32, 4), (33, 5), (64, 8), (100, 6),
             (128, 8), (200, 17), (256, 8), (256, 256)]:
    for gate_kind in ("f32", "int4", "int8"):
        route_case(37, 97, E, k, torch.float32, gate_kind, "softmax", False)
    route_case(130, 256, E, k, torch.bfloat16, "bf16", "sigmoid", True)
    route_case(65, 64, E, k, torch.float16, "int4", "softmax", True, gs=16)
route_case(0, 32, 5, 3, torch.float32, "f32", "softmax", False)

# exact ties: the lower expert index wins
case()
gate = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 0.0], [2.0, 1.0], [2.0, 1.0], [1.0, 1.0]], device=dev)
x = torch.tensor([[1.0, 1.0], [0.0, 0.0]], device=dev)
cnt = torch.zeros(6, dtype=torch.int64, device=dev)
_, ids = C.route_profile(x, gate, None, 0, 1, 4, "softmax", False, cnt)
if ids.tolist() != [[1, 3, 4, 5], [0, 1, 2, 3]] or cnt.tolist() != [1, 2, 1, 2, 1, 1]:
    fail("route_profile ties", f"{ids.tolist()} {cnt.tolist()}")

# ---- moe_routing: exact against the reference
def routing_case(T, E, k, G, id_dtype, drop=0.2, out_of_range=False):
    name = f"moe_routing T={T} E={E} k={k} G={G} {id_dtype} oor={out_of_range}"
    case()
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    e2g = torch.randint(0, G, (E,), generator=gen, dtype=torch.int32)
    e2g[torch.rand(E, generator=gen) < drop] = -1
    ids_dev = ids.clone()
    e2g_dev = e2g.clone()
    if out_of_range and T:
        # Out-of-range ids / groups must act as dropped (no crash, no out-of-bounds read).
        ids_dev[0, 0] = E + 1000
        ids_dev[-1, -1] = -3
        ids = ids.clone(); ids[0, 0] = E; ids[-1, -1] = E  # expert E (appended) is dropped
        e2g_dev[0] = G + 7
        e2g = torch.cat((e2g, torch.tensor([-1], dtype=torch.int32)))
        e2g[0] = -1
    ref = R.moe_routing(ids, e2g, G)
    got = C.moe_routing(ids_dev.to(id_dtype).to(dev), e2g_dev.to(dev), G)
    for n, a, b in zip(("group_offsets", "sorted_slot", "pair_of_slot"), got, ref):
        if not torch.equal(a.cpu(), b):
            return fail(name, f"{n} differs")


for T, E, k, G in [(0, 4, 2, 3), (1, 1, 1, 1), (17, 8, 3, 2), (64, 16, 16, 5), (300, 64, 8, 64),
                   (1000, 64, 8, 7), (4097, 128, 8, 100), (20000, 256, 8, 256), (5000, 32, 4, 1)]:
    for id_dtype in (torch.int32, torch.int64):
        routing_case(T, E, k, G, id_dtype)
    routing_case(T, E, k, G, torch.int64, out_of_range=True)
routing_case(100, 8, 4, 3, torch.int32, drop=1.0)

# ---- CUDA graph capture (fails on any host synchronisation)
case()
try:
    ids = torch.randint(0, 64, (2048, 8), device=dev, dtype=torch.int32)
    e2g = torch.arange(64, device=dev, dtype=torch.int32) % 40
    x = torch.randn(2048, 512, device=dev, dtype=torch.bfloat16)
    qg, sg = C.quantize(torch.randn(64, 512, device=dev), 4, 64)
    cnt = torch.zeros(64, dtype=torch.int64, device=dev)
    C.moe_routing(ids, e2g, 40); C.route_profile(x, qg, sg, 4, 64, 8, "softmax", False, cnt)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = C.moe_routing(ids, e2g, 40)
        rw, rid = C.route_profile(x, qg, sg, 4, 64, 8, "softmax", False, cnt)
    cnt.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = C.moe_routing(ids, e2g, 40)
    if not all(torch.equal(a, b) for a, b in zip(out, ref)):
        fail("graph moe_routing", "replay differs")
    if int(cnt.sum()) != 2048 * 8:
        fail("graph route_profile", "counts after replay")
except Exception as exc:
    fail("graph capture", repr(exc))

# ---- timings (CUDA events, median of 50 after warm-up) for the tuning notes
def timeit(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


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
    results["timings_ms"][f"route_profile T={T} H={H} E={E} k={k} x=bf16 gate={gk}"] = {
        "ms": round(ms, 4), "GB/s": round(nbytes / ms / 1e6, 1),
        "fp32 TFLOP/s": round(2 * T * H * E / ms / 1e9, 2)}
for T, k, E, G in [(16384, 8, 64, 40), (131072, 8, 256, 256)]:
    ids = torch.randint(0, E, (T, k), device=dev, dtype=torch.int32)
    e2g = torch.arange(E, device=dev, dtype=torch.int32) % G
    ms = timeit(lambda: C.moe_routing(ids, e2g, G))
    ms_ref = timeit(lambda: R.moe_routing(ids, e2g, G), reps=20)
    results["timings_ms"][f"moe_routing T={T} k={k} E={E} G={G}"] = {"ms": round(ms, 4), "reference_ms": round(ms_ref, 4)}
for rows, cols in [(8192, 8192)]:
    w = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
    for bits in (4, 8):
        ms = timeit(lambda: C.quantize(w, bits, 64))
        q, s = C.quantize(w, bits, 64)
        msd = timeit(lambda: C.dequantize(q, s, bits, 64, cols, torch.bfloat16))
        results["timings_ms"][f"quantize {rows}x{cols} bf16 int{bits} g64"] = {"ms": round(ms, 4)}
        results["timings_ms"][f"dequantize {rows}x{cols} int{bits} g64 -> bf16"] = {"ms": round(msd, 4)}

for key, val in results["timings_ms"].items():
    print(f"{key:70s} {val}")
print(f"kernel check: {results['cases']} cases, {len(results['failures'])} failures")
json.dump(results, open(sys.argv[1], "w"), indent=1)
sys.exit(1 if results["failures"] else 0)
EOF
}

step_ceilings() {
  "$PY" - "$WORK/ceilings.json" <<'EOF'
# The two ceilings of METHOD.md: device-to-device copy (bytes read + written) and an
# 8192^3 bf16 matmul, on random data, CUDA events, median after warm-up.
import json, sys
import torch


def median_ms(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2], ts


n = 1 << 30  # 1 GiB each way, far beyond L2
src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
dst = torch.empty_like(src)
ms, _ = median_ms(lambda: dst.copy_(src), 30)
copy = {"bytes_each_way": n, "median_ms": round(ms, 4), "GB/s_read+write": round(2 * n / ms / 1e6, 1)}
del src, dst
m = 8192
a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
ms, _ = median_ms(lambda: a @ b, 30)
mm = {"shape": [m, m, m], "dtype": "bf16", "median_ms": round(ms, 4), "TFLOP/s": round(2 * m**3 / ms / 1e9, 1)}
res = {"copy": copy, "matmul_bf16": mm}
print(json.dumps(res, indent=1))
json.dump(res, open(sys.argv[1], "w"), indent=1)
EOF
}

step_test_gpu() {
  "$PY" -m pytest tests -m gpu -q -rfE -p no:cacheprovider --benchmark-disable --timeout 600
}

step_bench() {
  if [ ! -f benchmarks/run.py ]; then
    echo "benchmarks/run.py not found: skipping the kernel benchmarks"
    return 0
  fi
  mkdir -p "$OUT/bench"
  # shellcheck disable=SC2086  # FLUX_BENCH_ARGS is a list of options
  "$PY" -m benchmarks.run --device cuda --out "$OUT/bench" $BENCH_ARGS
}

step_test_all() {
  "$PY" -m pytest tests benchmarks -q -rfE -p no:cacheprovider --benchmark-disable --timeout 900
}

step_sanitize() {  # opt-in: compute-sanitizer memcheck over small calls of every CUDA op
  command -v compute-sanitizer >/dev/null 2>&1 || { echo "compute-sanitizer not found"; return 1; }
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" - <<'EOF'
import torch
import flux._C  # noqa: F401
C = torch.ops.flux_C
d = "cuda"
for bits in (4, 8):
    q, s = C.quantize(torch.randn(5, 37, device=d), bits, 8)
    C.dequantize(q, s, bits, 8, 37, torch.bfloat16)
    for E in (3, 40, 256):
        C.route_profile(torch.randn(45, 37, device=d, dtype=torch.bfloat16),
                        *C.quantize(torch.randn(E, 37, device=d), bits, 8), bits, 8, min(E, 4),
                        "softmax", True, torch.zeros(E, dtype=torch.int64, device=d))
ids = torch.randint(-2, 70, (33, 5), device=d)  # out-of-range ids must not be read through
e2g = torch.randint(-3, 12, (64,), device=d, dtype=torch.int32)
C.moe_routing(ids, e2g, 9)
C.moe_routing(ids[:0], e2g, 9)
torch.cuda.synchronize()
print("sanitize: done")
EOF
}

# ------------------------------------------------------------------------------------ run
export -f step_info step_build step_check step_ceilings step_test_gpu step_bench step_test_all \
  step_sanitize
export PY WORK OUT BENCH_ARGS
say "gpu_session: $(date -u +%Y-%m-%dT%H:%M:%SZ) root=$ROOT OUT=$OUT budget=${BUDGET}s steps: ${STEPS[*]}"
for step in "${STEPS[@]}"; do
  case $step in
    info) run_step info 60 step_info ;;
    build)
      if run_step build 360 step_build; then BUILD_OK=1; fi
      ;;
    check | test_gpu | test_all | bench | sanitize)
      if [ "$BUILD_OK" != 1 ] && [[ " ${STEPS[*]} " == *" build "* ]]; then
        skip_step "$step" "the build failed"
        continue
      fi
      case $step in
        check) run_step check 240 step_check ;;
        test_gpu) run_step test_gpu 300 step_test_gpu ;;
        test_all) run_step test_all 600 step_test_all ;;
        bench) run_step bench 300 step_bench ;;
        sanitize) run_step sanitize 300 step_sanitize ;;
      esac
      ;;
    ceilings) run_step ceilings 120 step_ceilings ;;
    *)
      say "unknown step '$step' (steps: info build check ceilings test_gpu bench test_all sanitize)"
      ANY_FAILED=1
      ;;
  esac
done

# ------------------------------------------------------------------------------------ summary
"$PY" - "$WORK" "$OUT/session.json" "$((ANY_FAILED))" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, subprocess, sys
work, out, failed = sys.argv[1], sys.argv[2], sys.argv[3] == "1"


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:
        return f"unavailable ({exc})"


def load(name):
    path = os.path.join(work, name)
    return json.load(open(path)) if os.path.exists(path) else None


session = {
    "gpu": sh("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader"),
    "nvcc": sh("nvcc --version | tail -2 | head -1"),
    "git_commit": sh("git rev-parse HEAD 2>/dev/null") or "unknown (no .git on this machine)",
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
session["ceilings"] = load("ceilings.json")
session["kernel_check"] = load("check.json")
session["ok"] = not failed
json.dump(session, open(out, "w"), indent=1)

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
for s in steps:
    print(f"{s['step']:10s} {s['status']:16s} {s['rc']:4d} {s['seconds']:5d}")
print("result:", "OK" if session["ok"] else "FAILED", f"(files in {os.path.dirname(out)})")
EOF
exit $ANY_FAILED
