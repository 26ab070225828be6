#!/usr/bin/env bash
# Compile check of the CUDA sources on a machine with nvcc and no GPU (CI; scripts/test.sh).
#
#   1. every csrc/cuda/*.cu is compiled with nvcc -c (warnings are errors), in parallel;
#   2. the kernel files and csrc/cuda/kernels.h include no torch headers (they must build
#      without a CUDA torch), and kernels.h is valid plain C++ (the wrappers include it);
#   3. the torch-facing wrappers csrc/cuda/*.cpp get a g++ -fsyntax-only pass against the
#      installed torch's headers when those include c10/cuda (the CPU wheel ships them), which
#      catches most mistakes that would otherwise surface only in a CUDA build.  Skip it with
#      FLUX_CHECK_WRAPPERS=0.
#
# Exits non-zero if any step fails.  Knobs: NVCC (default nvcc), FLUX_CHECK_ARCHS (space-
# separated compute capabilities, default "90"), CXX (default g++), JOBS (default nproc),
# CUDA_HOME (default: the toolkit nvcc belongs to).
set -uo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
ARCHS=${FLUX_CHECK_ARCHS:-90}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_sources: nvcc not found (set NVCC)" >&2
  exit 1
fi
# The toolkit's include dir, for the host-compiler steps (nvcc may be a wrapper script, so ask it).
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$("$NVCC" --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi
CUDA_INC=$CUDA_HOME/include
shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
cpp_files=(csrc/cuda/*.cpp)
if [ ${#cu_files[@]} -eq 0 ]; then
  echo "check_cuda_sources: no csrc/cuda/*.cu files"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0

# --- 2. no torch in the kernel files ----------------------------------------------------------
if grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10|caffe2|pybind11)/' \
    csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h 2>/dev/null; then
  echo "FAIL: the lines above include torch headers in a kernel file (only csrc/cuda/*.cpp may)" >&2
  failed=1
fi

# --- 1. nvcc, one job per file ----------------------------------------------------------------
gencode=()
for a in $ARCHS; do gencode+=("-gencode=arch=compute_${a},code=sm_${a}"); done
# The defines are the ones torch's CMake adds to every CUDA compile of an extension: the kernels
# must not rely on implicit half/bfloat16 conversions or operators.
nvcc_flags=(-std=c++17 -O2 "${gencode[@]}" -Werror all-warnings --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -Icsrc)

compile_one() {  # $1 = source file; writes $work/<name>.log and .rc
  local src=$1 name
  name=$(basename "$src")
  "$NVCC" "${nvcc_flags[@]}" -c "$src" -o "$work/$name.o" >"$work/$name.log" 2>&1
  echo $? >"$work/$name.rc"
}

wrapper_check() {  # g++ -fsyntax-only of the wrappers against torch's headers
  local inc
  local py=${PYTHON:-python}
  command -v "$py" >/dev/null 2>&1 || py=python3
  if ! inc=$("$py" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))" 2>/dev/null); then
    echo "skipped: torch not importable" >"$work/wrappers.log"; echo 0 >"$work/wrappers.rc"; return
  fi
  local first=${inc%% *}
  if [ ! -f "$first/c10/cuda/CUDAStream.h" ]; then
    echo "skipped: this torch has no c10/cuda headers" >"$work/wrappers.log"; echo 0 >"$work/wrappers.rc"; return
  fi
  local flags=(-std=c++17 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Wno-c++20-extensions
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -I"$CUDA_INC" -Icsrc)
  for d in $inc; do flags+=(-isystem "$d"); done
  local rc=0 f
  : >"$work/wrappers.log"
  for f in "${cpp_files[@]}"; do
    "$CXX" "${flags[@]}" "$f" >>"$work/wrappers.log" 2>&1 || rc=1
  done
  # Warnings in our own files count as failures, as in the nvcc step.
  if grep -q "^csrc/.*warning:" "$work/wrappers.log"; then rc=1; fi
  echo $rc >"$work/wrappers.rc"
}

start=$(date +%s)
pids=()
run_limited() {  # keep at most $JOBS background jobs
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.1; done
  "$@" &
  pids+=($!)
}
for f in "${cu_files[@]}"; do run_limited compile_one "$f"; done
if [ "${FLUX_CHECK_WRAPPERS:-1}" != "0" ] && [ ${#cpp_files[@]} -gt 0 ]; then
  run_limited wrapper_check
fi
# kernels.h must compile as plain C++ without torch (the wrappers include it).
if ! echo '#include "cuda/kernels.h"' | "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -x c++ \
    -I"$CUDA_INC" -Icsrc - \
    >"$work/header.log" 2>&1; then
  echo "FAIL  csrc/cuda/kernels.h is not valid C++ on its own:" >&2
  cat "$work/header.log" >&2
  failed=1
fi
wait "${pids[@]}"

for f in "${cu_files[@]}"; do
  name=$(basename "$f")
  if [ "$(cat "$work/$name.rc" 2>/dev/null || echo 1)" != "0" ]; then
    echo "FAIL  $f" >&2
    cat "$work/$name.log" >&2
    failed=1
  else
    echo "ok    $f"
  fi
done
if [ -f "$work/wrappers.rc" ]; then
  if [ "$(cat "$work/wrappers.rc")" != "0" ]; then
    echo "FAIL  csrc/cuda/*.cpp (g++ -fsyntax-only against torch headers)" >&2
    cat "$work/wrappers.log" >&2
    failed=1
  elif grep -q "^skipped" "$work/wrappers.log"; then
    echo "skip  csrc/cuda/*.cpp: $(cat "$work/wrappers.log")"
  else
    echo "ok    csrc/cuda/*.cpp (syntax against torch headers)"
  fi
fi
echo "check_cuda_sources: $((${#cu_files[@]})) .cu files, archs ${ARCHS}, $(($(date +%s) - start)) s"
exit $failed
