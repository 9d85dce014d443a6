"""SourceAnalyzer(score_dtype=...): the pairwise scoring contraction in bf16/fp16 (fp32 accumulation) gives the
rankings of the fp32 scores; the stored scores record it."""
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import source_fast as sf
from _models import ClassificationTask, small_mlp_run


def _float32_run(num_segments=2):
    model, data, ckpts, steps, lrs = small_mlp_run()
    ckpts32 = [{k: v.float() for k, v in c.items()} for c in ckpts]
    x, y = data.tensors
    return model.float(), TensorDataset(x.float(), y), sf.TrainingRun(ckpts32, steps, lr=lrs, num_segments=num_segments)


def _spearman(a, b):
    ra, rb = a.double().argsort().argsort().double(), b.double().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fit_first", [True, False], ids=["fit-then-score", "one-pass"])
def test_low_precision_scores_keep_the_rankings(dtype, fit_first):
    model, data, run = _float32_run()
    queries = Subset(data, range(8))

    def scores(score_dtype):
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=16,
                                     progress=False, score_dtype=score_dtype)
        if fit_first:
            analyzer.fit(data)
        return analyzer.pairwise_scores(queries, data)

    full, low = scores(None), scores(dtype)
    assert low.dtype == torch.float32 and low.shape == full.shape
    rel = float((low - full).norm() / full.norm())
    assert 1e-6 < rel < 3e-2, rel  # rounded (not bitwise fp32), yet close
    for q in range(full.shape[0]):
        assert _spearman(low[q], full[q]) > 0.99, q
    assert torch.equal(scores(torch.float32), full)  # float32 is the compute dtype: the same numbers


def test_stored_scores_record_the_score_dtype(tmp_path):
    model, data, run = _float32_run()
    queries = Subset(data, range(4))

    def analyzer(score_dtype, **kw):
        return sf.SourceAnalyzer(model, ClassificationTask(), run, tmp_path, fisher="empirical", batch_size=16,
                                 progress=False, score_dtype=score_dtype, **kw)

    low = analyzer(torch.bfloat16).pairwise_scores(queries, data)
    assert torch.equal(analyzer(torch.bfloat16).pairwise_scores(queries, data), low)  # resumed: stored
    with pytest.raises(ValueError, match="configuration"):
        analyzer(None).pairwise_scores(queries, data)
    full = analyzer(None, overwrite=True).pairwise_scores(queries, data)
    assert not torch.equal(full, low)


def test_score_dtype_is_validated():
    model, data, run = _float32_run()
    with pytest.raises(ValueError, match="score_dtype must be None, torch.float32, torch.bfloat16 or torch.float16"):
        sf.SourceAnalyzer(model, ClassificationTask(), run, score_dtype="bfloat16")


def test_influence_self_scores_in_low_precision():
    """method="influence": self-influence rows rounded to bf16 (eigenbases and weights in fp32) stay close to
    fp32 and keep the ranking; SOURCE's walked self-scores ignore score_dtype (same numbers)."""
    model, data, run = _float32_run()

    def self_scores(method, score_dtype):
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, method=method, fisher="empirical",
                                     batch_size=16, progress=False, score_dtype=score_dtype,
                                     **({"damping": 0.01} if method == "influence" else {}))
        return analyzer.self_scores(data)

    full, low = self_scores("influence", None), self_scores("influence", torch.bfloat16)
    rel = float((low - full).norm() / full.norm())
    assert 1e-6 < rel < 3e-2, rel
    assert _spearman(low, full) > 0.99
    assert torch.equal(self_scores("source", torch.bfloat16), self_scores("source", None))
