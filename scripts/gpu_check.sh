#!/usr/bin/env bash
# Everything a lent GPU machine should check, in priority order, each step under a time limit, inside one
# overall deadline (a lease is short): build the CUDA extension, measure the device's ceilings, run the `gpu`
# tests, tune the Triton tiles, profile materialised score_pairwise, then the op benchmarks (each row is written
# as soon as it is measured, so a cut-off run keeps them).
#
#   OUT=gpu_out DEADLINE_S=540 SOURCE_FAST_GIT_COMMIT=$(git rev-parse --short=12 HEAD) bash scripts/gpu_check.sh
#
# (on a lent machine: run it with a command timeout a little above DEADLINE_S; the H100 run of 2026-11-26
# needed ≈ 25 s to build, 70 s for the tests, 50 s to tune and 20-75 s per op benchmark; a machine started in
# ≈ 30 s). Steps and their caps: BUILD_CUDA=0, SKIP_TESTS=1, TESTS_S, DETERMINISM_S, TUNE_S (0: skip), PROFILE_S
# (0: skip), BENCH_S, BENCH_PLAN; a re-check of some ops: GPU_TESTS, GPU_TESTS_K, TUNE_ONLY (see below).
#
# Needs a python3 with a CUDA torch and triton (a GPU image's own; nothing is downloaded). Results and logs go
# to $OUT (at most 8 files come back): env.txt (with the build's log) roofline.json gpu_tests.log
# triton_blocks.json bench.log ops_gpu.csv ops_gpu.md, and with E2E=1 vs_kronfluence_<gpu>.{csv,md} (then set
# TUNE_S=0: nine files would be one too many). Afterwards, on the development machine:
#   python benchmarks/import_gpu_results.py <the folder the files came back in> --dispatch
# merges them into benchmarks/results/ (ops_<gpu>.csv/.md, roofline_<gpu>.json, triton_blocks_<gpu>.json),
# regenerates the dispatch table and the measured Triton tiles (source_fast/kernels/_tuned_blocks.py).
#
# E2E=1 also runs benchmarks/bench_vs_kronfluence.py --device cuda (both libraries on the GPU). Kronfluence is
# pure Python: bring it as a folder, e.g. `mkdir -p .kf && cp -r .venv/lib/python3*/site-packages/kronfluence
# .kf/ && echo /.kf/ >> .git/info/exclude`, carried with the call; .kf is put on PYTHONPATH when present.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-420}
export PYTHONUNBUFFERED=1
left() { echo $((DEADLINE_S - ($(date +%s) - START))); }
step() { echo "== $(date -u +%T) [$(left) s left] $*"; }
# run under min(cap, time left - reserve); skipped when under 10 s would remain
limited() { local cap=$1; shift; local t; t=$(left); t=$((t < cap ? t : cap)); if [ "$t" -lt 10 ]; then
  echo "skipped (deadline): $*"; return 124; fi; timeout "$t" "$@"; }

step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(),
'| sm', torch.cuda.get_device_capability())"
  nvcc --version | tail -2; nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step "build (CUDA ${BUILD_CUDA:-1}, sm_80 + sm_90)"
BUILD_LOG=$(mktemp)
limited 240 env SOURCE_FAST_BUILD_EXT=1 SOURCE_FAST_BUILD_CUDA="${BUILD_CUDA:-1}" CUDAARCHS="80;90" MAX_JOBS="$(nproc)" \
  "$PY" -m pip install --no-build-isolation --no-deps -e . > "$BUILD_LOG" 2>&1
rc=$?; { echo "--- build (pip install -e ., CUDA on), rc=$rc"; cat "$BUILD_LOG"; } >> "$OUT/env.txt"
tail -3 "$BUILD_LOG"; [ $rc -eq 0 ] || { echo "BUILD FAILED rc=$rc"; tail -60 "$BUILD_LOG"; exit 1; }
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
from source_fast import _dispatch
for name, backend in _dispatch.BACKENDS.items():
    print(f"backend {name}: {backend.availability() or 'available'}")
EOF

step "device ceilings"
limited 60 "$PY" benchmarks/bench_roofline.py --out "$OUT/roofline.json"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
step "gpu tests (determinism last)"
# GPU_TESTS / GPU_TESTS_K: a re-check of some ops only, e.g. GPU_TESTS="tests/ops/test_covariance.py" and
# GPU_TESTS_K="covariance" (the determinism tests are selected by -k too)
# shellcheck disable=SC2086  # GPU_TESTS is a list of paths
limited "${TESTS_S:-240}" "$PY" -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider -o timeout=120 \
  ${GPU_TESTS:-tests} ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} --ignore=tests/ops/test_determinism_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
limited "${DETERMINISM_S:-90}" "$PY" -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider -o timeout=120 \
  tests/ops/test_determinism_gpu.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} >> "$OUT/gpu_tests.log" 2>&1
echo "pytest (determinism) rc=$?"; tail -2 "$OUT/gpu_tests.log"
fi

# The Triton tile tables were chosen from sm_90 builds without a GPU: time their candidates (bf16 scoring and the
# memory-bound covariance first) and let the benchmarks below run with the measured choices.
if [ "${TUNE_S:-150}" -gt 0 ]; then
step "tune Triton tiles"
# TUNE_ONLY: some entries only (tune_triton.py --only); the import adds such a run to the device's previous one
limited "${TUNE_S:-150}" "$PY" benchmarks/tune_triton.py --out "$OUT/triton_blocks.json" \
  --budget-s $(( ${TUNE_S:-150} - 30 )) ${TUNE_ONLY:+--only "$TUNE_ONLY"} >> "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -E "^BEST|ERROR|WRONG|^tuned" "$OUT/bench.log" | tail -12
# the open targets' numbers in the command's own output too (bf16 scoring TFLOP/s, the memory-bound covariance)
grep -E "^  (pairwise_one|pairwise_many|per_token|covariance_narrow)" "$OUT/bench.log" | head -30
[ -s "$OUT/triton_blocks.json" ] && export SOURCE_FAST_TRITON_BLOCKS="$(cd "$OUT" && pwd)/triton_blocks.json" \
  && echo "benchmarks run with SOURCE_FAST_TRITON_BLOCKS=$SOURCE_FAST_TRITON_BLOCKS" | tee -a "$OUT/env.txt"
fi

# Where materialised several-token scoring spends its time (forming G against contracting it), into bench.log
if [ "${PROFILE_S:-45}" -gt 0 ]; then
step "profile materialised score_pairwise (bf16, T = 16)"
limited "${PROFILE_S:-45}" "$PY" benchmarks/profile_pairwise_materialized.py --device cuda >> "$OUT/bench.log" 2>&1
echo "rc=$?"; grep -E "^PROFILE" "$OUT/bench.log" | tail -2
fi

# BENCH_PLAN: ";"-separated "op[:extra args]" entries, e.g. "score_pairwise:--dtypes bfloat16;score_self"
# (default: every op against the torch path only; the Kronfluence baselines are CPU comparisons and slow here).
# Default order = what the issue's open GPU targets need first: bf16 scoring (≥ 60 % of the tensor-core roof;
# the rewritten Triton score_pairwise has never been timed), covariance (its memory-bound case: ≥ 70 % of
# bandwidth), the other scoring ops, then the rest (measured once already, 2026-11-26).
ALL="torch,triton,cuda"
PLAN=${BENCH_PLAN:-score_pairwise:--impls $ALL --dtypes bfloat16;covariance:--impls $ALL;score_lowrank:--impls $ALL;score_per_token:--impls $ALL;score_pairwise:--impls $ALL --dtypes float32;score_self:--impls $ALL;lambda_accum:--impls $ALL;kron_project:--impls $ALL}
IFS=';' read -r -a ENTRIES <<< "$PLAN"
for entry in "${ENTRIES[@]}"; do
  op=${entry%%:*}; extra=""; [ "$op" != "$entry" ] && extra=${entry#*:}
  step "bench $op $extra"
  # shellcheck disable=SC2086  # extra is a list of arguments
  limited "${BENCH_S:-75}" "$PY" benchmarks/bench_$op.py --device cuda --out "$OUT/ops_gpu.csv" $extra \
    >> "$OUT/bench.log" 2>&1
  echo "rc=$?"; grep -E "^GATE|ERROR" "$OUT/bench.log" | grep -v PASS | tail -5
done
if [ "${E2E:-0}" = 1 ]; then
  step "end to end vs Kronfluence on the GPU"
  [ -d .kf ] && export PYTHONPATH="$PWD/.kf${PYTHONPATH:+:$PYTHONPATH}"
  limited "${E2E_S:-240}" "$PY" benchmarks/bench_vs_kronfluence.py --device cuda --out-dir "$OUT" 2>&1 | tail -12
fi
step "done"
grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | head -40
# The open targets' rows in the command's own output: bf16 score_pairwise per backend (ms, TFLOP/s), the PROFILE line
[ -s "$OUT/ops_gpu.csv" ] && "$PY" -c 'import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    if r["op"] == "score_pairwise" and r["dtype"] == "bfloat16":
        print("  {backend:<6} {mode:<5} {shape_params:<32} {ms_p50:>10} ms {tflops:>8} TFLOP/s".format(**r))
' "$OUT/ops_gpu.csv"
grep -E "^PROFILE" "$OUT/bench.log" 2>/dev/null | tail -1
# ... and the tuner's several-token rows: the fused form's tiles and the cuBLAS stages against the materialised form
[ -s "$OUT/triton_blocks.json" ] && "$PY" -c 'import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    if r["entry"].startswith("pairwise_many"):
        ms = r.get("ms")
        timed = "%9.2f ms" % ms if isinstance(ms, float) and ms == ms else "        -   "
        state = "ok" if r.get("ok") else "NOT OK " + str(r.get("error", "wrong result"))[:80]
        print("  {:<30} {:<46} {} {}".format(r["entry"], str(r.get("candidate")), timed, state))
' "$OUT/triton_blocks.json"
grep -E "^BEST pairwise_many" "$OUT/bench.log" 2>/dev/null
