"""The Adam variant (SOURCE_MATH.md §4): an approximation, checked where it is exact and end to end."""
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast import spectral
from source_fast.ekfac import EKFACBlock, source_operators
from source_fast.walk import query_walk

from _models import ClassificationTask, adam_mlp_run, classification_data, mlp, train_run

F64 = torch.float64


def test_adam_walk_with_unit_preconditioner_and_diagonal_curvature_equals_sgd():
    # Identity eigenbases: H is diagonal, so exp(−c p̄⊙diag H) with p̄ = 1 is exp(−cH) exactly and
    # (H + δ)⁻¹(1 − exp(−cH)) → r(H) as δ → 0.
    o, i = 3, 4
    lam = torch.rand(o, i, dtype=F64) + 0.1
    block = {"w": EKFACBlock(torch.eye(i, dtype=F64), torch.eye(o, dtype=F64), lam)}
    u = {"w": torch.randn(2, o, i, dtype=F64)}
    c = 0.8
    sgd = query_walk(u, [block, block], [source_operators(c), source_operators(2 * c)])
    adam = query_walk(u, [block, block], [source_operators(c), source_operators(2 * c)],
                      adam=[{"w": torch.ones(o, i, dtype=F64)}] * 2, adam_damping=[{"w": 1e-12}] * 2)
    for a, b in zip(sgd, adam):
        assert torch.allclose(a["w"], b["w"], rtol=1e-9, atol=1e-12)
    # A preconditioner that doubles every coordinate is the same as doubling c in the exponent.
    doubled = query_walk(u, [block], [source_operators(c)], adam=[{"w": 2 * torch.ones(o, i, dtype=F64)}],
                         adam_damping=[{"w": 1e-12}])
    expected = spectral.evaluate(spectral.accumulation(2 * c), lam) * u["w"]
    assert torch.allclose(doubled[0]["w"], expected, rtol=1e-9)


def test_adam_run_end_to_end():
    model, data, ckpts, steps, moments, run = adam_mlp_run()
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, batch_size=8, progress=False)
    scores = analyzer.pairwise_scores(Subset(data, range(3)), data)
    assert scores.shape == (3, 16) and torch.isfinite(scores).all()
    assert torch.allclose(analyzer.self_scores(data), torch.diagonal(analyzer.pairwise_scores(data, data)),
                          rtol=1e-8)
    # The preconditioner matters: a 100× larger v̂ (smaller steps) changes the scores.
    big = sf.TrainingRun(ckpts, steps, lr=1e-3, num_segments=2, optimizer="adam",
                         adam_second_moments=[{k: 100 * v for k, v in m.items()} for m in moments])
    other = sf.SourceAnalyzer(model, ClassificationTask(), big, batch_size=8, progress=False)
    assert not torch.allclose(scores, other.pairwise_scores(Subset(data, range(3)), data), rtol=1e-3)


def test_curvature_report_of_an_adam_run_counts_the_preconditioned_exponent():
    """On an Adam run the walk's exponent is c·p̄ ⊙ diag H̄: a v̂ of 1e-8 (p̄ ≈ 10⁴) makes directions influence-like
    that c·σ alone would call TracIn-like."""
    from source_fast.diagnostics import curvature_report

    data = classification_data(n=16)
    model = mlp()
    ckpts, steps, _ = train_run(model, data, steps=12, every=3, lr=0.1)

    def report(v_hat):
        moments = [{k: torch.full_like(v, v_hat) for k, v in c.items()} for c in ckpts]
        run = sf.TrainingRun(ckpts, steps, lr=1e-3, num_segments=2, optimizer="adam", adam_second_moments=moments)
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, batch_size=8, progress=False).fit(data)
        return analyzer, curvature_report(analyzer)

    analyzer, rows = report(1e-8)
    p_bar = 1 / (1e-4 + 1e-8)
    for row in rows:
        block = analyzer.blocks[row["segment"]][row["layer"]]
        x = row["c"] * p_bar * block.diagonal().clamp_min(0).reshape(-1)
        assert row["influence_like"] == pytest.approx(float((x > row["high"]).double().mean()))
        assert row["tracin_like"] == pytest.approx(float((x < row["low"]).double().mean()))
    assert sum(r["influence_like"] for r in rows) > sum(r["influence_like"] for r in report(1.0)[1])
