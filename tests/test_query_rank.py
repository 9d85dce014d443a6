"""SourceAnalyzer(query_rank=R): each scored direction truncated to rank R by SVD and contracted by
ops.score_lowrank, against the dense oracle truncating its own directions (float64 SVD of its dense operators)."""
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast import analyzer as analyzer_module, io, ops
from source_fast.directions import LowRankDirections, truncated
from source_fast.reference.dense_source import dense_source_scores

from _models import (ClassificationTask, classification_data, mlp, one_channel_conv_run, padded_gpt2_run,
                     train_run)


def _rel(x, y):
    return ((x - y).abs().max() / y.abs().max()).item()


@pytest.fixture(scope="module")
def mlp_run():
    """A 6-8-3 MLP (layers [8, 7] and [3, 9] with the bias column: rank 2 truncates both), 30 SGD steps."""
    data = classification_data(n=30, d_in=6)
    model = mlp(d_in=6, hidden=8)
    ckpts, steps, lrs = train_run(model, data, steps=30, every=5, lr=0.3)
    return model, data, sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)


def _counting_lowrank(monkeypatch):
    calls = []
    real = ops.score_lowrank
    monkeypatch.setattr(ops, "score_lowrank", lambda u, w, a, g, **kw: calls.append(u.shape[2]) or real(u, w, a, g,
                                                                                                         **kw))
    return calls


def test_truncated_is_the_best_rank_r_approximation():
    v = torch.randn(3, 7, 5, dtype=torch.float64)
    low = truncated(v, 2)
    assert isinstance(low, LowRankDirections) and low.shape == v.shape and low.rank == 2
    s = torch.linalg.svdvals(v)
    err = torch.linalg.matrix_norm(low.dense() - v) ** 2
    assert torch.allclose(err, (s[:, 2:] ** 2).sum(1), rtol=1e-10)  # Eckart–Young: the discarded σ²
    assert truncated(v, 5) is v and truncated(v, 9) is v  # rank ≥ min(O, I): exact, kept dense


@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
def test_subspace_iteration_gives_the_truncated_svd(monkeypatch, spectrum):
    """Layers wide next to the rank take the subspace iteration: on a decaying spectrum (as walked directions have)
    it converges in a few steps to within a thousandth of σ_{R+1} of the SVD's truncation; a flat one (Gaussian)
    does not converge and those queries take the full SVD."""
    from source_fast import directions

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(4, 60, 50, generator=gen, dtype=torch.float64)
    if spectrum == "decaying":
        u, _, vh = torch.linalg.svd(v, full_matrices=False)
        v = u @ torch.diag_embed(0.7 ** torch.arange(50, dtype=torch.float64)) @ vh
    full_svds = []
    real = directions._svd_factors
    monkeypatch.setattr(directions, "_svd_factors", lambda x, r: full_svds.append(x.shape[0]) or real(x, r))
    low = truncated(v, 4)
    exact = real(v, 4).dense()
    # off the exact truncation by a thousandth of what the truncation discards (σ₅ in the 2-norm): here 1e-5
    off = torch.linalg.matrix_norm(low.dense() - exact, ord=2)
    assert (off <= 2e-3 * torch.linalg.svdvals(v)[:, 4]).all()
    assert full_svds == ([] if spectrum == "decaying" else [4])
    assert torch.equal(truncated(v, 4).u, low.u)  # seeded: the same factors every time


@pytest.mark.parametrize("schedule", ["one pass", "segment by segment", "block by block"])
@pytest.mark.parametrize("method", ["source", "influence"])
def test_low_rank_scores_match_the_oracle_truncating_its_own_directions(mlp_run, monkeypatch, method, schedule):
    model, data, run = mlp_run
    if schedule == "block by block":
        monkeypatch.setattr(analyzer_module, "SEGMENT_MAJOR_MAX_SCORE_BYTES", 0)
    extra = {"damping": 0.05} if method == "influence" else {}
    queries = Subset(data, range(4))
    calls = _counting_lowrank(monkeypatch)
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=7, progress=False,
                                 method=method, query_rank=2, **extra)
    if schedule != "one pass":
        analyzer.fit(data)
    scores = analyzer.pairwise_scores(queries, data)
    assert calls and set(calls) == {2}
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, method=method, query_rank=2, **extra)
    exact = dense_source_scores(model, ClassificationTask(), run, queries, data, method=method, **extra)
    assert _rel(scores, oracle) <= 1e-8
    assert _rel(exact, oracle) > 1e-4  # the truncation matters here (4 orders above the agreement)
    full = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=7, progress=False,
                             method=method, query_rank=7, **extra)
    assert _rel(full.pairwise_scores(queries, data), exact) <= 1e-8  # rank ≥ min(O, I) everywhere: exact


def test_wide_layers_truncated_by_subspace_iteration_match_the_oracle(monkeypatch):
    """A 30-30-3 MLP at rank 2: its [30, 31] layer is wide enough for the subspace iteration (no full SVD)."""
    from source_fast import directions

    data = classification_data(n=24, d_in=30)
    model = mlp(d_in=30, hidden=30)
    ckpts, steps, lrs = train_run(model, data, steps=12, every=4, lr=0.3)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    full_svds = []
    real = directions._svd_factors
    monkeypatch.setattr(directions, "_svd_factors", lambda x, r: full_svds.append(tuple(x.shape)) or real(x, r))
    queries = Subset(data, range(3))
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=8, progress=False,
                                 query_rank=2)
    scores = analyzer.pairwise_scores(queries, data)
    assert all(shape[1:] != (30, 31) for shape in full_svds)  # the [3, 31] head: a full SVD (small)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, query_rank=2)
    truncation = _rel(dense_source_scores(model, ClassificationTask(), run, queries, data), oracle)
    assert truncation > 1e-4 and _rel(scores, oracle) <= 1e-2 * truncation  # a hundredth of the truncation's effect


def test_low_rank_gpt2_with_padding_and_per_token_scores_that_still_sum():
    pytest.importorskip("transformers")
    model, data, _, task, names, run = padded_gpt2_run()
    queries = Subset(data, range(3))
    analyzer = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=4, progress=False, query_rank=3)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, task, run, queries, data, module_names=names, query_rank=3)
    assert _rel(scores, oracle) <= 1e-8
    assert _rel(analyzer.per_token_scores(queries, data).sum(-1), scores) <= 1e-10
    assert len(analyzer._costlier_low_rank) == 4  # 6-token queries on [8 .. 32, 9 .. 33] layers: logged
    values, indices = analyzer.top_k(queries, data, k=4)
    assert torch.equal(indices, scores.topk(4, dim=1).indices) and torch.allclose(values, scores.topk(4, dim=1).values)


def test_low_rank_one_channel_convs_scored_from_their_formed_gradients(monkeypatch):
    """Layers of one input channel with two outputs per group (a Conv1d, a depthwise conv with multiplier 2) are
    scored from their per-example gradients on CPU (rows.Formed): there the truncated direction is formed densely
    (the strided depthwise layer, one output per group, stays exact)."""
    model, data, ckpts, steps, lrs = one_channel_conv_run()
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    formed = []
    real = analyzer_module.as_dense
    monkeypatch.setattr(analyzer_module, "as_dense", lambda v: formed.append(type(v).__name__) or real(v))
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=4, progress=False,
                                 query_rank=1)
    queries = Subset(data, range(3))
    scores = analyzer.pairwise_scores(queries, data)
    assert "LowRankDirections" in formed
    assert _rel(scores, dense_source_scores(model, ClassificationTask(), run, queries, data, query_rank=1)) <= 1e-8


def test_stored_scores_record_the_rank(mlp_run, tmp_path):
    model, data, run = mlp_run
    queries = Subset(data, range(2))

    def scores(rank, **kw):
        return sf.SourceAnalyzer(model, ClassificationTask(), run, tmp_path, fisher="empirical", progress=False,
                                 query_rank=rank, **kw).pairwise_scores(queries, data)

    first = scores(2)
    assert torch.equal(scores(2), first)
    with pytest.raises(io.StoreMismatchError):
        scores(3)
    assert not torch.allclose(scores(3, overwrite=True), first)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_per_token_contraction_of_low_rank_directions_equals_the_dense_op(dtype, tol):
    """per_token's factored form Σ_r (gᵀU)_r (aᵀW)_r against ops.score_per_token on the formed V = U Wᵀ."""
    from source_fast.per_token import _low_rank_per_token

    gen = torch.Generator().manual_seed(0)
    low = LowRankDirections(torch.randn(3, 7, 2, generator=gen, dtype=dtype),
                            torch.randn(3, 5, 2, generator=gen, dtype=dtype))
    a, g = torch.randn(4, 6, 5, generator=gen, dtype=dtype), torch.randn(4, 6, 7, generator=gen, dtype=dtype)
    want = ops.score_per_token(low.dense().double(), a.double(), g.double())
    got = _low_rank_per_token(low, a, g)
    assert got.shape == (3, 4, 6) and got.dtype == dtype
    assert ((got.double() - want).abs().max() / want.abs().max()).item() <= tol
