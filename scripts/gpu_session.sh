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
# The steps' Python is in benchmarks/gpu_session.py (info, build check, ceilings, kernel timings,
# session.json) and in the gpu-marked tests (tests/ops/test_cuda_ops.py is the check step,
# tests/ops/test_cuda_memcheck.py what the sanitize step runs under compute-sanitizer).
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
  "$PY" -m benchmarks.gpu_session info
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
  "$PY" -m benchmarks.gpu_session build-check
}

step_check() {
  # Direct check of torch.ops.flux_C on CUDA tensors against the reference (the gpu-marked
  # tests of tests/ops/test_cuda_ops.py, reported in session.json from their JUnit XML), then a
  # few timings for the tuning work.
  local rc=0
  "$PY" -m pytest tests/ops/test_cuda_ops.py -q -rfE -p no:cacheprovider --benchmark-disable \
    --junitxml="$WORK/check.xml" || rc=1
  "$PY" -m benchmarks.gpu_session kernel-timings "$WORK/kernel_timings.json" || rc=1
  return "$rc"
}

step_ceilings() {
  # The two ceilings of METHOD.md: device copy bandwidth and an 8192^3 bf16 matmul.
  "$PY" -m benchmarks.gpu_session ceilings "$WORK/ceilings.json"
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
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest tests/ops/test_cuda_memcheck.py \
    -q -rfE -p no:cacheprovider --benchmark-disable && echo "sanitize: done"
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
"$PY" -m benchmarks.gpu_session summary "$WORK" "$OUT/session.json" "$((ANY_FAILED))" 2>&1 | tee -a "$LOG"
exit $ANY_FAILED
