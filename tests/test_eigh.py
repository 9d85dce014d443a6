"""The float64 eigendecompositions of the covariance factors (`source_fast._linalg.eigh`): either LAPACK gives
torch.linalg.eigh's contract, the automatic choice follows its rule, and numpy's runs on torch's thread count."""
import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast import _linalg, ekfac
from source_fast.reference.dense_source import dense_source_scores

from _models import ClassificationTask, classification_data, mlp, train_run

LAPACKS = ["torch", "numpy"]


def _symmetric(n, seed=0, repeated=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.rand(n, generator=gen, dtype=torch.float64) * 10
    values[:repeated] = 3.0  # a repeated eigenvalue: any basis of its space is a right answer
    return (q * values) @ q.T, values.sort().values


@pytest.mark.parametrize("lapack", LAPACKS)
@pytest.mark.parametrize("n,repeated", [(1, 0), (2, 2), (41, 0), (123, 5), (300, 0)])
def test_either_lapack_decomposes_like_torch(monkeypatch, lapack, n, repeated):
    monkeypatch.setenv("SOURCE_FAST_EIGH_LAPACK", lapack)
    matrix, values = _symmetric(n, seed=n, repeated=repeated)
    assert _linalg.eigh_lapack(matrix)[0] == lapack
    evals, evecs = _linalg.eigh(matrix)
    assert evals.dtype == evecs.dtype == torch.float64 and evecs.shape == (n, n)
    torch.testing.assert_close(evals, values, rtol=0, atol=1e-12 * 10 * n)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12 * n)
    torch.testing.assert_close((evecs * evals) @ evecs.T, matrix, rtol=0, atol=1e-12 * 10 * n)


@pytest.mark.parametrize("lapack", LAPACKS)
def test_reads_the_lower_triangle_of_a_strided_matrix(monkeypatch, lapack):
    """Like torch.linalg.eigh (UPLO="L"): the upper triangle is not read; a transposed slice is a valid input."""
    monkeypatch.setenv("SOURCE_FAST_EIGH_LAPACK", lapack)
    matrix, values = _symmetric(50, seed=3)
    big = torch.zeros(60, 70, dtype=torch.float64)
    big[5:55, 7:57] = matrix.T
    view = big[5:55, 7:57].T  # non-contiguous
    upper = torch.triu(torch.ones(50, 50, dtype=torch.bool), diagonal=1)
    view.masked_fill_(upper, 1e3)  # garbage above the diagonal
    evals, _ = _linalg.eigh(view)
    torch.testing.assert_close(evals, values, rtol=0, atol=1e-10)


def test_automatic_choice(monkeypatch):
    monkeypatch.delenv("SOURCE_FAST_EIGH_LAPACK", raising=False)
    matrix, _ = _symmetric(_linalg._NUMPY_EIGH_MIN_SIZE)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr(_linalg, "_numpy_lapack", lambda: "scipy-openblas")
    for vendor, want in [("AuthenticAMD", "numpy"), ("HygonGenuine", "numpy"), ("GenuineIntel", "torch"),
                         ("", "torch")]:
        monkeypatch.setattr(_linalg, "cpu_vendor", lambda vendor=vendor: vendor)
        assert _linalg.eigh_lapack(matrix)[0] == want, vendor
    monkeypatch.setattr(_linalg, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(_linalg, "_numpy_lapack", lambda: "accelerate")
    lapack, why = _linalg.eigh_lapack(matrix)
    assert lapack == "torch" and "accelerate" in why
    monkeypatch.setattr(_linalg, "_numpy_lapack", lambda: "scipy-openblas")
    assert _linalg.eigh_lapack(matrix[:-1, :-1])[0] == "torch"  # small: no faster elsewhere
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    assert _linalg.eigh_lapack(matrix) == ("torch", "torch's LAPACK is not MKL")
    # only float64 CPU tensors outside autograd ever leave torch
    monkeypatch.setenv("SOURCE_FAST_EIGH_LAPACK", "numpy")
    assert _linalg.eigh_lapack(matrix.float())[0] == "torch"
    assert _linalg.eigh_lapack(matrix.clone().requires_grad_())[0] == "torch"
    assert _linalg.eigh_lapack(matrix.to("meta"))[0] == "torch"


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("SOURCE_FAST_EIGH_LAPACK", "mkl")
    with pytest.raises(ValueError, match=r"SOURCE_FAST_EIGH_LAPACK must be one of .*'mkl'"):
        _linalg.eigh(_symmetric(4)[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_lapack_runs_on_torchs_thread_count(monkeypatch, threads):
    from threadpoolctl import threadpool_info

    monkeypatch.setenv("SOURCE_FAST_EIGH_LAPACK", "numpy")
    seen = []
    real = np.linalg.eigh

    def recording(*args, **kw):
        seen.append({info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"})
        return real(*args, **kw)

    monkeypatch.setattr(np.linalg, "eigh", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _linalg.eigh(_symmetric(20)[0])
    finally:
        torch.set_num_threads(before)
    assert seen and seen[0] <= {threads}, seen  # (empty where no BLAS library reports itself)


def test_numpy_failure_is_torchs_error_and_a_curvature_error(monkeypatch):
    monkeypatch.setenv("SOURCE_FAST_EIGH_LAPACK", "numpy")

    def failing(*args, **kw):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(np.linalg, "eigh", failing)
    with pytest.raises(torch.linalg.LinAlgError, match="numpy's LAPACK: Eigenvalues did not converge"):
        _linalg.eigh(_symmetric(6)[0])
    with pytest.raises(ekfac.CurvatureError, match=r"layer 'fc', segment 2, size \(6, 6\)"):
        ekfac.eigen_basis(_symmetric(6)[0].float(), name="fc", segment=2)


@pytest.mark.parametrize("lapack", LAPACKS)
@pytest.mark.parametrize("method", ["source", "influence"])
def test_pipeline_matches_dense_oracle_with_either_lapack(monkeypatch, lapack, method):
    monkeypatch.setenv("SOURCE_FAST_EIGH_LAPACK", lapack)
    data = classification_data(n=16)
    model = mlp()
    ckpts, steps, lrs = train_run(model, data, steps=20, every=5, lr=0.3)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    kw = {"damping": 0.01} if method == "influence" else {}
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, method=method, fisher="empirical", batch_size=5,
                                 progress=False, **kw)
    queries = Subset(data, range(3))
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, method=method, **kw)
    assert ((scores - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6


def test_the_lapack_taken_is_logged_once(monkeypatch, caplog):
    import logging

    monkeypatch.setenv("SOURCE_FAST_EIGH_LAPACK", "numpy")
    _linalg._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="source_fast"):
        for _ in range(3):
            _linalg.eigh(_symmetric(5)[0])
    messages = [r.getMessage() for r in caplog.records if "numpy's LAPACK" in r.getMessage()]
    assert messages == ["source_fast: float64 eigendecompositions in numpy's LAPACK (SOURCE_FAST_EIGH_LAPACK=numpy)"]
