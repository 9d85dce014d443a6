"""benchmarks/lds_reproduction.py --quick end to end: structure only, never which method wins."""
import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lds_reproduction.py"
TASKS = ("digits_brief", "digits_converged", "two_stage", "regression", "digits_decay", "digits_decay_converged",
         "logistic_decay", "logistic_decay_converged")
PROTOCOLS = ("same_epochs", "same_steps")


@pytest.fixture(scope="module")
def lds():
    if "lds_reproduction" in sys.modules:
        return sys.modules["lds_reproduction"]
    spec = importlib.util.spec_from_file_location("lds_reproduction", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lds_reproduction"] = module  # retraining workers unpickle its functions by module name
    spec.loader.exec_module(module)
    return module


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_end_to_end(lds, tmp_path):
    out = tmp_path / "out"
    assert lds.main(["--quick", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--workers", "2",
                     "--no-progress"]) == 0
    rows = _read(out / "lds_cpu.csv")
    methods = [key for key, *_ in lds.METHODS]
    assert len(methods) == 7
    for task in TASKS:
        for method in methods:
            for protocol in PROTOCOLS:
                match = [r for r in rows if (r["task"], r["method"], r["protocol"]) == (task, method, protocol)]
                assert len(match) == 1, (task, method, protocol)
                r = match[0]
                assert r["ablation"] == "False"
                value, low, high = float(r["lds"]), float(r["ci_low"]), float(r["ci_high"])
                assert math.isfinite(value) and -1.0 <= value <= 1.0
                assert -1.0 <= low <= value <= high <= 1.0
                assert int(r["n_valid"]) >= 1 and int(r["num_subsets"]) == 8 and int(r["num_seeds"]) == 2
    for r in rows:  # ablations too
        assert -1.0 <= float(r["lds"]) <= 1.0
    md = (out / "lds_cpu.md").read_text()
    assert lds.NOTES_MARKER in md and "## LDS" in md
    assert all(label in md for _, label, *_ in lds.METHODS if "L=1" not in label)
    assert (out / "lds_cpu.png").read_bytes().startswith(b"\x89PNG")

    # Hand-written notes below the marker survive a regeneration, which is served from the cache.
    (out / "lds_cpu.md").write_text(md + "my analysis\n")
    assert lds.main(["--quick", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
                     "--no-progress", "--no-plot", "--no-ablations", "--tasks", "regression"]) == 0
    md = (out / "lds_cpu.md").read_text()
    assert md.endswith("my analysis\n") and md.count(lds.NOTES_MARKER) == 1
    assert {r["task"] for r in _read(out / "lds_cpu.csv")} == {"regression"}


def test_training_protocols_and_gradients(lds):
    specs = lds.make_specs(quick=True)
    for spec in specs.values():
        assert lds.check_gradients(spec) < 1e-5
        data = lds.build_data(spec)
        keep_all = np.ones(len(data.x), dtype=bool)
        _, ckpts, steps, full_lrs = lds.train(spec, data, keep_all, 0, "full", record=True)
        assert len(ckpts) == len(steps) == sum(s.checkpoints for s in spec.stages) and steps[-1] == len(full_lrs)
        half = np.zeros(len(data.x), dtype=bool)
        half[::2] = True
        _, _, _, same_steps = lds.train(spec, data, half, 1, "same_steps")
        _, _, _, same_epochs = lds.train(spec, data, half, 1, "same_epochs")
        assert same_steps == full_lrs  # same steps and the same per-step learning rates
        # same epochs: about half the steps and lr mass (a bit more: each pass rounds up to whole batches)
        assert len(same_epochs) < 0.7 * len(full_lrs)
        assert sum(same_epochs) < 0.7 * sum(full_lrs)


def test_cli_lds_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "source_fast", "lds", "--quick", "--tasks", "regression",
                           "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--workers",
                           "0", "--no-progress"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SOURCE (L=3, C=6)" in proc.stdout
    rows = _read(tmp_path / "out" / "lds_cpu.csv")
    assert {r["task"] for r in rows} == {"regression"}
    assert len({r["method"] for r in rows if r["ablation"] == "False"}) == 7


def test_cli_lds_defaults_to_quick_and_forwards_options(monkeypatch):
    from source_fast import cli

    calls = []

    class Script:
        @staticmethod
        def main(argv):
            calls.append(argv)
            return 0

    monkeypatch.setattr(cli, "_load_lds_script", lambda: Script)
    assert cli.main(["lds"]) == 0
    assert cli.main(["lds", "--full", "--tasks", "two_stage", "--workers", "0", "--cache-dir", "c"]) == 0
    assert calls[0] == ["--quick", "--workers", "2"]
    assert calls[1] == ["--full", "--workers", "0", "--cache-dir", "c", "--tasks", "two_stage"]
