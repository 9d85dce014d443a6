"""Numerics: degenerate and rank-deficient curvature, low-precision models, determinism."""
import warnings

import pytest
import torch
from scipy.stats import spearmanr
from torch.utils.data import Subset, TensorDataset

import source_fast as sf
from source_fast import ekfac, ops, spectral

from _models import ClassificationTask, classification_data, mlp, train_run


def test_identity_covariance_degenerate_spectrum_is_handled():
    evals, evecs = ekfac.eigen_basis(torch.eye(6), name="layer", segment=0)
    assert torch.allclose(evals, torch.ones(6, dtype=torch.float64))
    # Any orthonormal basis is valid; only basis-invariant quantities are compared.
    assert torch.allclose(evecs @ evecs.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    v = torch.randn(2, 3, 6, dtype=torch.float64)
    lam = torch.full((3, 6), 2.0, dtype=torch.float64)
    out = ops.kron_project(v, torch.eye(3, dtype=torch.float64), evecs, lam, spectral.accumulation(0.5))
    assert torch.allclose(out, v * spectral.evaluate(spectral.accumulation(0.5), lam))


def test_rank_deficient_factors_from_few_examples():
    # 3 examples, a 40-wide hidden layer: A is 41×41 of rank ≤ 4 (fp32 round-off gives tiny negatives).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
    data = TensorDataset(torch.randn(3, 30), torch.tensor([0, 1, 2]))
    ckpts = [{k: v.clone() for k, v in model.state_dict().items()} for _ in range(2)]
    run = sf.TrainingRun(ckpts, [5, 10], lr=0.1, num_segments=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*clamped to 0")  # round-off negatives are clamped silently
        scores = sf.SourceAnalyzer(model, ClassificationTask(), run, progress=False).pairwise_scores(data, data)
    assert torch.isfinite(scores).all()


def test_clamp_warns_only_beyond_round_off():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*clamped to 0")
        ekfac.eigen_basis(torch.diag(torch.tensor([1.0, 0.5, -1e-9])), name="l", segment=0)
    with pytest.warns(RuntimeWarning, match="clamped to 0"):
        ekfac.eigen_basis(torch.diag(torch.tensor([1.0, 0.5, -0.2])), name="l", segment=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_model_accumulates_in_fp32_and_ranks_like_fp32(dtype):
    data = classification_data(n=30, d_in=5, dtype=torch.float32)
    model = mlp(d_in=5, hidden=6, dtype=torch.float32)
    ckpts, steps, lrs = train_run(model, data, steps=12, every=3, lr=0.3)
    run32 = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    ref = sf.SourceAnalyzer(model, ClassificationTask(), run32, fisher="empirical", progress=False)
    queries = Subset(data, range(4))
    want = ref.pairwise_scores(queries, data)
    low = [{k: v.to(dtype) for k, v in c.items()} for c in ckpts]
    x, y = data.tensors
    low_data = TensorDataset(x.to(dtype), y)
    analyzer = sf.SourceAnalyzer(mlp(d_in=5, hidden=6, dtype=dtype), ClassificationTask(),
                                 sf.TrainingRun(low, steps, lr=lrs, num_segments=2), fisher="empirical",
                                 progress=False)
    got = analyzer.pairwise_scores(Subset(low_data, range(4)), low_data)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert analyzer.blocks[0]["0"].lam.dtype == torch.float32
    for q in range(4):
        assert spearmanr(got[q].numpy(), want[q].numpy()).statistic > 0.9


def test_deterministic_mode_is_bitwise_reproducible():
    data = classification_data(n=20)
    model = mlp()
    ckpts, steps, lrs = train_run(model, data, steps=12, every=3)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    results = [sf.SourceAnalyzer(model, ClassificationTask(), run, deterministic=True, progress=False
                                 ).pairwise_scores(Subset(data, range(3)), data) for _ in range(3)]
    assert all(torch.equal(results[0], r) for r in results[1:])
