"""The README's main job: `source-fast demo` runs end to end and finds flipped labels."""
import json
import subprocess
import sys


def test_demo_cli_runs_and_flags_mislabeled_examples(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "source_fast", "demo", "--output-dir", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "proponents:" in proc.stdout and "opponents:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "source_demo.png").stat().st_size > 10_000
    # Flipped labels (15 % of the data) should dominate each query's strongest opponents.
    assert summary["flipped_rate_opponents"] > 0.5 > summary["flipped_rate_proponents"]
    assert (out / "factors").exists() is False and (out / "source" / "factors" / "segment_2.safetensors").exists()


def test_demo_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "source_fast", "demo", "--num-queries", "0"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "--num-queries must be >= 1" in proc.stderr
