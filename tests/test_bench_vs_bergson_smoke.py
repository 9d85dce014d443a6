"""benchmarks/bench_vs_bergson.py --smoke, source_fast's side only (Bergson lives in its own environment,
.venv-bergson, and is not needed here): exit 0, a measured source_fast row, the SMOKE marker, and nothing
written to benchmarks/results (smoke timings are not measurements)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # the workload is a GPT-2 from a transformers config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_vs_bergson.py"


def _results_state():
    d = REPO / "benchmarks" / "results"
    return {p.name: p.stat().st_mtime_ns for p in d.glob("vs_bergson_*")} if d.exists() else {}


def test_bench_vs_bergson_smoke_source_fast_only():
    env = dict(os.environ)
    env.pop("SOURCE_FAST_BACKEND", None)
    before = _results_state()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--libraries", "source_fast", "--threads", "1"],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench_vs_bergson.py --smoke exited {proc.returncode}:\n{out[-4000:]}"
    assert any(line.startswith("source_fast  run 1: total") for line in proc.stdout.splitlines()), out[-4000:]
    assert "SMOKE" in proc.stdout
    assert _results_state() == before, "bench_vs_bergson.py --smoke wrote to benchmarks/results"
