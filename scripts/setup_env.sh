#!/usr/bin/env bash
# Create .venv and install source_fast with everything its tests, demo and benchmarks use.
# CPU development/CI pins (BUILD_NOTES.md): torch 2.13.0 is a local CPU wheel here; an unpinned torch
# would pull a multi-GB CUDA build. GPU users: install your CUDA torch (and triton) first, then
# `pip install -e '.[test]'` — pyproject.toml only asks for torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q torch==2.13.0 triton==3.7.1 -e '.[test,hf]'
# Kronfluence (cross-check test, comparison benchmark) without dependency resolution, so pip never
# swaps the CPU torch; see requirements-kronfluence.txt for why each package is there.
.venv/bin/pip install -q --no-deps -r requirements-kronfluence.txt
.venv/bin/python -c "import torch, source_fast; print('source_fast', source_fast.__version__, '| torch', torch.__version__)"
