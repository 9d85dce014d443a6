"""source_fast.diagnostics: curvature regimes per layer and segment, the table, the PNG and the CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from source_fast import SourceAnalyzer, TrainingRun
from source_fast.demo import DigitsTask, load_digits_data, make_model, train
from source_fast.diagnostics import curvature_report, format_report, plot_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The demo's setup, shrunk: 300 digits, 2 epochs, 6 checkpoints."""
    torch.manual_seed(0)
    (x, y, _, _), _ = load_digits_data(flip_fraction=0.15, seed=0)
    x, y = x[:300], y[:300]
    model = make_model()
    paths, steps, lrs = train(model, x, y, epochs=2, batch_size=32, lr=0.05, momentum=0.9, num_checkpoints=6,
                              out_dir=tmp_path_factory.mktemp("ckpts"), seed=0)
    return model, TensorDataset(x, y), paths, steps, lrs


def _report(digits_run, lr_scale=1.0, method="source", num_segments=3):
    model, data, paths, steps, lrs = digits_run
    run = TrainingRun(paths, steps, lr=[lr * lr_scale for lr in lrs], momentum=0.9, num_segments=num_segments)
    analyzer = SourceAnalyzer(model, DigitsTask(), run, method=method, batch_size=100, progress=False)
    analyzer.fit(data)
    return analyzer, curvature_report(analyzer)


def _mean_share(rows, key):
    return float(np.mean([r[key] for r in rows]))


def test_report_rows_cover_every_segment_and_layer_and_shares_sum_to_one(digits_run):
    analyzer, rows = _report(digits_run)
    assert [(r["segment"], r["layer"]) for r in rows] == [(s, name) for s in range(3) for name in ("0", "2")]
    for r, seg in zip(rows, [s for s in analyzer.run.segments for _ in range(2)]):
        assert r["tracin_like"] + r["intermediate"] + r["influence_like"] == pytest.approx(1.0, abs=1e-12)
        assert min(r["tracin_like"], r["intermediate"], r["influence_like"]) >= 0
        assert r["c"] == pytest.approx(seg.c) and r["stage"] == seg.stage and r["steps"] == seg.num_steps
        spectrum = r["spectrum"]
        block = analyzer.blocks[r["segment"]][r["layer"]]
        assert spectrum.shape == (block.lam.numel(),) == (r["n_directions"],)
        assert np.all(np.diff(spectrum) <= 0) and spectrum[-1] >= 0
        assert r["sigma_max"] == pytest.approx(float(block.lam.max()))
        assert r["source_damping"] == pytest.approx(1.0 / seg.c)
        # Recount the shares from Λ directly.
        x = seg.c * block.lam.double().clamp_min(0).flatten().numpy()
        assert r["tracin_like"] == pytest.approx(np.mean(x < 0.1))
        assert r["influence_like"] == pytest.approx(np.mean(x > 10))


def test_regimes_move_with_the_learning_rate(digits_run):
    _, base = _report(digits_run)
    _, big = _report(digits_run, lr_scale=1000.0)
    _, small = _report(digits_run, lr_scale=1e-3)
    # c × 1000: directions move from TracIn-like towards influence-like; c ÷ 1000: everything is TracIn-like.
    assert _mean_share(big, "influence_like") > _mean_share(base, "influence_like") + 0.01
    assert _mean_share(big, "tracin_like") < _mean_share(base, "tracin_like") - 0.01
    for b, l in zip(big, base):  # per row, never the other way
        assert b["influence_like"] >= l["influence_like"] and b["tracin_like"] <= l["tracin_like"]
    assert _mean_share(small, "tracin_like") == 1.0
    assert _mean_share(small, "influence_like") == 0.0 <= _mean_share(base, "influence_like")
    for b, s, l in zip(big, small, base):  # the curvature itself does not depend on the schedule
        np.testing.assert_allclose(b["spectrum"], l["spectrum"])
        np.testing.assert_allclose(s["spectrum"], l["spectrum"])


def test_thresholds_are_configurable_and_validated(digits_run):
    analyzer, rows = _report(digits_run)
    wide = curvature_report(analyzer, low=1e-9, high=1e9)
    assert _mean_share(wide, "intermediate") >= _mean_share(rows, "intermediate")
    for low, high in ((0.0, 1.0), (1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="0 < low < high"):
            curvature_report(analyzer, low=low, high=high)


def test_influence_is_one_segment_with_the_total_mass(digits_run):
    analyzer, rows = _report(digits_run, method="influence")
    assert {r["segment"] for r in rows} == {0} and len(rows) == 2
    assert rows[0]["c"] == pytest.approx(sum(s.c for s in analyzer.run.segments))


def test_unfitted_or_curvature_free_analyzers_are_refused(digits_run):
    model, data, paths, steps, lrs = digits_run
    run = TrainingRun(paths, steps, lr=lrs, momentum=0.9, num_segments=3)
    with pytest.raises(ValueError, match="fit"):
        curvature_report(SourceAnalyzer(model, DigitsTask(), run, progress=False))
    tracin = SourceAnalyzer(model, DigitsTask(), run, method="tracin", progress=False).fit(data)
    with pytest.raises(ValueError, match="uses no curvature"):
        curvature_report(tracin)


def test_format_report_has_one_line_per_row(digits_run):
    _, rows = _report(digits_run)
    text = format_report(rows)
    lines = text.splitlines()
    assert "cσ<0.1" in lines[0] and "cσ>10" in lines[0]
    assert len(lines) == 2 + len(rows) + 1
    assert format_report([]) == "(empty curvature report)"


def test_plot_report_writes_a_png_from_rows_or_analyzer(digits_run, tmp_path):
    analyzer, rows = _report(digits_run)
    for source, name in ((rows, "rows.png"), (analyzer, "analyzer.png")):
        path = plot_report(source, tmp_path / "sub" / name)
        data = (tmp_path / "sub" / name).read_bytes()
        assert path == str(tmp_path / "sub" / name)
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]  # atomic: no temp files left


def test_cli_diagnostics_prints_the_table_and_writes_the_png(tmp_path):
    out = tmp_path / "diag"
    proc = subprocess.run([sys.executable, "-m", "source_fast", "diagnostics", "--output-dir", str(out), "--epochs",
                           "1", "--no-progress"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cσ<0.1" in proc.stdout and "between" in proc.stdout
    assert (out / "curvature.png").read_bytes().startswith(PNG_MAGIC)
    rows = json.loads((out / "curvature.json").read_text())
    assert len(rows) == 6  # 3 segments × 2 layers
    for r in rows:
        assert r["tracin_like"] + r["intermediate"] + r["influence_like"] == pytest.approx(1.0)


def test_cli_diagnostics_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "source_fast", "diagnostics", "--low", "5", "--high", "1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "--low" in proc.stderr
