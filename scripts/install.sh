#!/usr/bin/env bash
# One-shot set-up on a fresh machine: pinned requirements, then the compiled extension.
# torch is pinned through the constraints file: a floating torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -r requirements/dev.txt
# --no-build-isolation: build against the torch installed above, never a freshly downloaded one.
python -m pip install -q --disable-pip-version-check --no-build-isolation -c requirements/constraints.txt -e .
# pyenv only puts new console scripts (`flux`) on PATH after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
command -v flux >/dev/null 2>&1 || echo "note: the 'flux' command is not on PATH; use 'python -m flux.cli' or add $(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH" >&2
python -m flux.env
