"""Every benchmark script runs in --smoke mode: exit 0, the correctness gate passes for the torch backend,
nothing fails the gate, and nothing is written to benchmarks/results (smoke timings are not measurements)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPTS = ["bench_covariance.py", "bench_lambda_accum.py", "bench_kron_project.py", "bench_score_pairwise.py",
           "bench_score_self.py", "bench_score_lowrank.py", "bench_score_per_token.py", "bench_gemm.py",
           "bench_rank_one_product.py", "bench_to_queries_innermost.py", "bench_conv_patch_rows.py",
           "bench_conv_patch_covariance.py", "bench_conv_group_grads.py", "bench_eigh.py",
           "bench_scoring_memory.py", "bench_nll_pair.py", "bench_linear_nll_pair.py",
           "bench_per_token_scores.py", "bench_query_rank.py"]


def _results_state():
    """The files these scripts write (other benchmarks may write results/ concurrently)."""
    d = BENCH / "results"
    return {p.name: p.stat().st_mtime_ns for p in d.glob("ops_*")} if d.exists() else {}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script):
    env = dict(os.environ)
    env.pop("SOURCE_FAST_BACKEND", None)  # the scripts choose backends explicitly
    before = _results_state()
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{out[-4000:]}"
    gates = [line for line in proc.stdout.splitlines() if line.startswith("GATE ")]
    assert any(re.match(r"GATE \S+ torch float(32|64): PASS", line) for line in gates), \
        f"{script}: no passing torch gate line:\n{out[-4000:]}"
    assert not [line for line in gates if "FAILED" in line], f"{script}: gate failures:\n{out[-4000:]}"
    assert "SMOKE" in proc.stdout
    assert _results_state() == before, f"{script} --smoke wrote to benchmarks/results"


def test_depthwise_cnn_bench_smoke():
    """bench_depthwise_cnn.py --smoke runs every stage with both handlings of the depthwise groups and the model in
    both memory formats, prints their scores' agreement (the same scores up to float32 rounding) and writes
    nothing."""
    before = sorted((BENCH / "results").glob("depthwise_cnn_cpu.*"))
    stamps = [p.stat().st_mtime_ns for p in before]
    proc = subprocess.run([sys.executable, str(BENCH / "bench_depthwise_cnn.py"), "--smoke", "--layouts", "both"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| influence_") or line.startswith("| source")]
    assert len(rows) == 16 and "SMOKE OK" in proc.stdout
    agreement = re.search(r"max \|difference\| / max \|score\|: (.*)", proc.stdout).group(1).split(", ")
    assert len(agreement) == 3 * 3 and all(float(v.split()[-1]) < 1e-3 for v in agreement), agreement
    after = sorted((BENCH / "results").glob("depthwise_cnn_cpu.*"))
    assert after == before and [p.stat().st_mtime_ns for p in after] == stamps


def test_op_bench_cases_filter():
    """--cases keeps the cases whose mode contains the text (the smoke run of score_pairwise has "T=1" and "T=4");
    text that matches none exits 2 naming it, before any measurement."""
    script = [sys.executable, str(BENCH / "bench_score_pairwise.py"), "--smoke", "--impls", "torch", "--cases"]
    proc = subprocess.run(script + ["T=4"], check=False, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("score_pairwise ")]
    assert rows and all(" T=4 " in line for line in rows), proc.stdout[-3000:]
    proc = subprocess.run(script + ["no such case"], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 2 and "'no such case'" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_bench_roofline_refuses_a_cpu_clearly():
    """The ceilings are a GPU's (the CPU tables carry none): without CUDA it exits 2 with a reason, writing nothing."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_roofline.py"), "--device", "cpu"], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr


def test_cpu_half_inputs_smoke():
    """The fp16/bf16 CPU comparison runs both backends on tiny shapes and writes nothing in --smoke."""
    before = sorted((BENCH / "results").glob("cpu_half_inputs.*"))
    stamps = [p.stat().st_mtime_ns for p in before]
    proc = subprocess.run([sys.executable, str(BENCH / "bench_cpu_half_inputs.py"), "--smoke"], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| score_pairwise")]
    assert len(rows) == 2 and all(line.rstrip().endswith("× |") for line in rows), proc.stdout
    after = sorted((BENCH / "results").glob("cpu_half_inputs.*"))
    assert after == before and [p.stat().st_mtime_ns for p in after] == stamps


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_sm90_builds_report_builds_every_kernel_form(arch):
    """benchmarks/sm90_builds.py compiles every kernel form at its default tiles for sm_90 and sm_80 (no GPU) and
    prints a row for each, none spilling: it follows the kernels' signatures and the tables' shapes, and the
    sm_80 tiles (`_blocks.ARCH_BLOCKS`) build cleanly there (the fused materialised form's spills 8 B after its
    loops: every pipelined sm_80 tile tried spills some)."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(BENCH / "sm90_builds.py"), "--no-write", "--arch", str(arch)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "kernel" not in line]
    assert len(rows) >= 10, proc.stdout
    if "no cuobjdump" not in proc.stdout:
        for line in rows:  # no spills at the defaults, except a few bytes after the loops where no sm_80 tile is clean
            spill = line.split("|")[5].strip()
            fused_on_sm80 = arch == 80 and "(fused:" in line.split("|")[1]
            assert spill == "0" or (fused_on_sm80 and spill.endswith("(0 in the inner loop)")), line


def test_profile_pairwise_materialized_smoke():
    """benchmarks/profile_pairwise_materialized.py runs both stages of one chunk (forming G, contracting it), by
    the Triton kernels and by torch's GEMMs, the whole op, and the fused form under the interpreter, and checks
    each against the oracle."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(BENCH / "profile_pairwise_materialized.py"), "--smoke"], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert re.search(r"^PROFILE pairwise_materialized: rel_err \S+, by cuBLAS \S+, fused \S+ \(ok\)", proc.stdout,
                     re.M), proc.stdout
    assert "SMOKE" in proc.stdout and "chunk" in proc.stdout


def test_ab_builds_compares_a_build_with_itself():
    """The A/B script loads each build under its own name and swaps it in: the same build twice gives the same
    results (diff 0) on every case of the chosen groups."""
    import importlib

    try:
        so = Path(importlib.import_module("source_fast._C").__file__)
    except ImportError as exc:
        pytest.skip(f"compiled module not built: {exc}")
    proc = subprocess.run([sys.executable, str(BENCH / "ab_builds.py"), str(so), str(so), "--cases",
                           "covariance,lambda_accum", "--repeats", "1"], check=False, cwd=BENCH,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("covariance", "lambda_accum"))]
    assert len(rows) == 4, out[-4000:]
    assert all(line.count("diff 0e+00") == 2 for line in rows), out[-4000:]


def test_bench_vs_kronfluence_smoke_every_workload():
    """The end-to-end comparison runs every workload (the MLPs and the CNN) at smoke sizes, in one process:
    every source_fast stage gets a time (Kronfluence's too where it is installed) and nothing is written."""
    before = {p.name: p.stat().st_mtime_ns for p in (BENCH / "results").glob("vs_kronfluence_*")}
    proc = subprocess.run([sys.executable, str(BENCH / "bench_vs_kronfluence.py"), "--smoke", "--workloads",
                           "cls,reg,cnn"], check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for workload in ("cls", "reg", "cnn"):
        for method, stages in (("influence", ("fit", "pairwise", "self")),
                               ("source", ("fit", "pairwise", "self", "one_pass"))):
            for stage in stages:
                assert re.search(rf"^{workload}\s+source_fast\s+{method}\s+{stage}\s+[\d.]+ s", proc.stdout, re.M), \
                    f"no {workload} {method} {stage} time:\n{out[-4000:]}"
    after = {p.name: p.stat().st_mtime_ns for p in (BENCH / "results").glob("vs_kronfluence_*")}
    assert after == before


def test_alternate_stage_smoke():
    """benchmarks/alternate_stage.py alternates one stage of both libraries in fresh processes (smoke: one pair)."""
    proc = subprocess.run([sys.executable, str(BENCH / "alternate_stage.py"), "--smoke"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    if proc.returncode == 2 and "kronfluence is not installed" in proc.stdout:
        pytest.skip("kronfluence is not installed")
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"^pair 1: Kronfluence influence [\d.]+ s, source_fast influence [\d.]+ s", proc.stdout, re.M), out
    assert re.search(r"1 alternating pairs: medians .* ratio [\d.]+ .*; SMOKE$", proc.stdout, re.M), out


def test_lds_decay_dense_curvature_smoke(tmp_path):
    """The weight-decay analysis script runs its quick mode (logistic regression: 650 parameters) and prints its table;
    for this convex model the Hessian is the Gauss-Newton matrix, so their rows agree."""
    proc = subprocess.run([sys.executable, str(BENCH / "lds_decay_dense_curvature.py"), "logistic_decay", "--quick",
                           "--cache-dir", str(tmp_path), "--workers", "0"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in proc.stdout.splitlines()
            if line.startswith(("| GGN", "| Hessian", "| EK-FAC"))}
    assert set(rows) == {"GGN + decay", "GGN + 1/Σηₖ", "Hessian + decay", "EK-FAC form, exact Λ, + decay (projected)",
                         "EK-FAC form, exact Λ, + 1/Σηₖ"}
    assert rows["GGN + decay"] == rows["Hessian + decay"]
    assert "SMOKE logistic_decay" in proc.stdout
