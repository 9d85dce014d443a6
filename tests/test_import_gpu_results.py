"""benchmarks/import_gpu_results.py: a GPU check's folder merged into the results tables in one step."""
import csv
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# The benchmark scripts import their siblings, and _harness puts the repository root on sys.path (to run
# from a checkout), where our `kernels/` folder shadows Hugging Face's `kernels` package: sys.path is
# restored after the imports and after each test, so later tests see the interpreter's own.
_SAVED_PATH = list(sys.path)
sys.path.insert(0, str(BENCH))
import _harness as H  # noqa: E402
import import_gpu_results as imp  # noqa: E402

sys.path[:] = _SAVED_PATH


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


def _row(op="covariance", backend="triton", dtype="float32", ms="1.0000", device="NVIDIA H200", shape="R=8,D=4"):
    row = {k: "" for k in H.COLUMNS}
    row.update(op=op, backend=backend, mode="nomask", dtype=dtype, shape_params=shape, ms_p50=ms, ms_p20=ms,
               ms_p80=ms, device_name=device, threads="16", status="ok", tflops="1.000", gbps="10.0")
    return row


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=H.COLUMNS)
        w.writeheader()
        w.writerows(rows)


def test_import_merges_renders_copies_and_regenerates_dispatch(tmp_path):
    results, out = tmp_path / "results", tmp_path / "files_at"
    results.mkdir()
    out.mkdir()
    # Already committed: torch and an old triton timing of one shape.
    _write_csv(results / "ops_nvidia_h200.csv", [_row(backend="torch", ms="2.0000"), _row(ms="4.0000")])
    # The new run remeasured triton there (now 2x faster than torch) and added a shape.
    _write_csv(out / "ops_gpu.csv", [_row(ms="1.0000"), _row(backend="torch", ms="3.0000", shape="R=16,D=4"),
                                     _row(ms="1.5000", shape="R=16,D=4")])
    roof = {"device_name": "NVIDIA H200", "copy_gbps": 4000.0, "mm_fp32_tflops": 50.0, "mm_tf32_tflops": 350.0,
            "mm_bf16_tflops": 650.0}
    (out / "roofline.json").write_text(json.dumps(roof))
    (out / "vs_kronfluence_nvidia_h200.md").write_text("# table\n")
    (out / "gpu_tests.log").write_text("....\n199 passed, 3 skipped in 70.1s\n")
    target = tmp_path / "_measured_gpu.py"
    done = imp.import_results(out, results, dispatch=True, dispatch_target=target)
    assert done["slug"] == "nvidia_h200"
    merged = H.read_csv(results / "ops_nvidia_h200.csv")
    assert (done["rows_before"], done["rows_after"]) == (2, 4)
    triton_small = [r for r in merged if r["backend"] == "triton" and r["shape_params"] == "R=8,D=4"]
    assert [r["ms_p50"] for r in triton_small] == ["1.0000"]  # replaced, not duplicated
    assert (results / "roofline_nvidia_h200.json").exists() and (results / "vs_kronfluence_nvidia_h200.md").exists()
    assert "% roof" in (results / "ops_nvidia_h200.md").read_text()
    table = target.read_text()
    assert "covariance" in table and "triton" in table  # the time-weighted ratio (2+3)/(1+1.5) = 2.0
    assert "2.0" in table
    assert done["gpu_tests.log"] == ["199 passed, 3 skipped in 70.1s"]


def test_import_refuses_mixed_devices_and_an_unnamed_folder(tmp_path):
    out = tmp_path / "files_at"
    out.mkdir()
    _write_csv(out / "ops_gpu.csv", [_row(), _row(device="NVIDIA H100 80GB HBM3")])
    with pytest.raises(SystemExit, match="mixes devices"):
        imp.import_results(out, tmp_path / "results")
    (out / "ops_gpu.csv").unlink()
    with pytest.raises(SystemExit, match="neither benchmark rows nor a roofline"):
        imp.import_results(out, tmp_path / "results")
    assert H.name_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"


def test_import_tuning_run_regenerates_the_tuned_tiles(tmp_path):
    """A tune_triton.py output is copied and turned into kernels/_tuned_blocks.py (validated; per capability the
    most recent run wins); the generated module is what kernels/_blocks.py reads."""
    results, out = tmp_path / "results", tmp_path / "files_at"
    results.mkdir()
    out.mkdir()
    (out / "roofline.json").write_text(json.dumps({"device_name": "NVIDIA H100 80GB HBM3"}))
    versions = {"torch": "2.11", "triton": "3.6.0", "cuda": "13.0", "git_commit": "abc"}
    old = {"device": "NVIDIA H200", "capability": "sm_90", "versions": versions, "date": "2026-11-26T01:00:00+00:00",
           "rows": [], "best": {"GEMM_GPU_BLOCKS": {"2": [64, 128, 64, 4]}}}
    (results / "triton_blocks_nvidia_h200.json").write_text(json.dumps(old))
    new = dict(old, device="NVIDIA H100 80GB HBM3", date="2026-11-27T01:00:00+00:00",
               best={"PAIRWISE_GPU_BLOCKS": {"2": [[128, 64, 32, 1, 8, 3], [128, 64, 32, 8, 8, 3]]}})
    (out / "triton_blocks.json").write_text(json.dumps(new))
    target = tmp_path / "_tuned_blocks.py"
    done = imp.import_results(out, results, tuned_target=target)
    assert (results / "triton_blocks_nvidia_h100_80gb_hbm3.json").exists()
    namespace = {}
    exec(target.read_text(), namespace)
    assert namespace["TUNED"] == done["tuned"]
    assert namespace["TUNED"]["sm_90"]["best"] == new["best"] and "H100" in namespace["TUNED"]["sm_90"]["source"]

    (out / "triton_blocks.json").write_text(json.dumps(dict(new, best={"GEMM_GPU_BLOCKS": {"2": [64, 64]}})))
    with pytest.raises(ValueError, match=r"GEMM_GPU_BLOCKS\[2\]"):
        imp.import_results(out, results, tuned_target=target)


def test_partial_tuning_run_adds_to_the_previous_one(tmp_path):
    """A run over some tables (tune_triton.py --only) keeps the device's previous choices for the others; a table
    it measured takes its choice, or the default where the run chose none; another capability replaces all."""
    results, out = tmp_path / "results", tmp_path / "files_at"
    results.mkdir()
    out.mkdir()
    (out / "roofline.json").write_text(json.dumps({"device_name": "NVIDIA H100 80GB HBM3"}))
    versions = {"torch": "2.11", "triton": "3.6.0", "cuda": "13.0", "git_commit": "abc"}
    row = lambda table: {"entry": "e", "table": table, "candidate": [1], "ok": True}  # noqa: E731
    full = {"device": "NVIDIA H100 80GB HBM3", "capability": "sm_90", "versions": versions,
            "date": "2026-11-26T01:00:00+00:00",
            "rows": [row("GEMM_GPU_BLOCKS"), row("LOWRANK_GPU_BLOCKS"), row("PER_TOKEN_GPU_BLOCKS")],
            "best": {"GEMM_GPU_BLOCKS": {"2": [128, 256, 64, 8]}, "LOWRANK_GPU_BLOCKS": {"2": [128, 64, 128, 8, 3]}}}
    (results / "triton_blocks_nvidia_h100_80gb_hbm3.json").write_text(json.dumps(full))
    partial = dict(full, date="2026-11-26T02:00:00+00:00",
                   rows=[row("PAIRWISE_MATERIALIZED_GPU_BLOCKS"), row("LOWRANK_GPU_BLOCKS")],
                   best={"PAIRWISE_MATERIALIZED_GPU_BLOCKS": {"2": [128, 128, 64, 8, 3]}})
    (out / "triton_blocks.json").write_text(json.dumps(partial))
    target = tmp_path / "_tuned_blocks.py"
    done = imp.import_results(out, results, tuned_target=target)
    best = done["tuned"]["sm_90"]["best"]
    assert best == {"GEMM_GPU_BLOCKS": {"2": [128, 256, 64, 8]},
                    "PAIRWISE_MATERIALIZED_GPU_BLOCKS": {"2": [128, 128, 64, 8, 3]}}  # lowrank: back to default
    merged = json.loads((results / "triton_blocks_nvidia_h100_80gb_hbm3.json").read_text())
    assert merged["merged_from"] == [full["date"]] and merged["date"] == partial["date"]
    assert [r["table"] for r in merged["rows"]] == ["GEMM_GPU_BLOCKS", "PER_TOKEN_GPU_BLOCKS",
                                                    "PAIRWISE_MATERIALIZED_GPU_BLOCKS", "LOWRANK_GPU_BLOCKS"]
    other = dict(partial, capability="sm_80", date="2026-11-26T03:00:00+00:00")
    (out / "triton_blocks.json").write_text(json.dumps(other))
    imp.import_results(out, results, tuned_target=target)
    assert "merged_from" not in json.loads((results / "triton_blocks_nvidia_h100_80gb_hbm3.json").read_text())
