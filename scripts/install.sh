#!/usr/bin/env bash
# One-shot set-up on a fresh machine: pinned requirements, then the compiled extension.
# torch is pinned through the constraints file: a floating torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -r requirements/dev.txt
# --no-build-isolation: build against the torch installed above, never a freshly downloaded one.
python -m pip install -q --disable-pip-version-check --no-build-isolation -c requirements/constraints.txt -e .
python -m flux.env
