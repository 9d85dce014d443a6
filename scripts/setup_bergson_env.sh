#!/usr/bin/env bash
# Create .venv-bergson: Bergson 2.5.1 beside (never inside) the project's .venv, for
# benchmarks/bench_vs_bergson.py. The project environment stays untouched.
#
# torch is pinned to the same CPU build as the project (2.13.0: a local CPU wheel here; an unpinned torch
# would pull a multi-GB CUDA build). Bergson and its dependencies are installed with --no-deps from
# requirements-bergson.txt (only what its SOURCE path imports; see that file for why).
# source_fast itself is not installed there: the benchmark runs each library in its own interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${BERGSON_VENV:-.venv-bergson}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q --no-deps -r requirements-bergson.txt
# Check from a neutral folder: the repo root has a `kernels/` package that would shadow the Hugging Face
# `kernels` distribution transformers probes for.
(cd "${TMPDIR:-/tmp}" && "$VENV/bin/python" -c "
import torch, importlib.metadata as m
from bergson.cli.commands import ApproxUnrolling
from bergson.approx_unrolling.pipeline import approx_unrolling_pipeline
assert not torch.version.cuda, 'a CUDA torch was installed: ' + torch.__version__
print('bergson', m.version('bergson'), '| torch', torch.__version__)")
