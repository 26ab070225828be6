#!/usr/bin/env bash
# The test command (README, .ci/run): nvcc compile check of the CUDA sources, then the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvcc >/dev/null 2>&1; then
  bash scripts/check_cuda_sources.sh
elif [ "${CI:-}" = "true" ]; then
  echo "nvcc not found: CI must compile-check the CUDA sources" >&2
  exit 1
else
  echo "nvcc not found: skipping the CUDA compile check (CI runs it)"
fi
markers=()
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: deselecting the gpu-marked tests (they run in scripts/gpu_session.sh)"
  markers=(-m "not gpu")
fi
# The extension is part of the install: a missing flux._C fails instead of falling back.
export FLUX_REQUIRE_EXTENSION=1
python -m pytest tests benchmarks "${markers[@]}" --benchmark-disable --timeout 1200 "$@"
