"""On CUDA the analyzer hands the scoring kernels rows padded to multiples of 16 elements (the Triton launchers'
alignment), the query directions once per group instead of a copy per call. Forced here on CPU: the scores are
those of the unpadded operands, and the directions are padded once, not per chunk of training rows."""
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast import analyzer as analyzer_module, ops
from test_score_dtype import _float32_run
from _models import ClassificationTask


def test_row_aligned_operands_give_the_same_scores(monkeypatch):
    monkeypatch.setenv("SOURCE_FAST_STACK_MIB", "0")  # one scoring call per batch: several calls per direction
    model, data, run = _float32_run()
    queries = Subset(data, range(8))

    def scores():
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=16,
                                     progress=False)
        return analyzer.pairwise_scores(queries, data)

    plain = scores()
    calls = []
    real = ops.score_pairwise

    def recording(v, a, g, **kw):
        calls.append((v.data_ptr(), tuple(v.shape), tuple(a.shape), tuple(g.shape)))
        return real(v, a, g, **kw)

    monkeypatch.setattr(ops, "score_pairwise", recording)
    monkeypatch.setattr(analyzer_module.SourceAnalyzer, "_aligns_rows", lambda self, x: True)
    padded = scores()
    assert calls and all(size % 16 == 0 for _, v, a, g in calls for size in (*v[1:], a[2], g[2])), calls
    assert {v[2] for _, v, _, _ in calls} == {16}  # the layers' 7 and 9 inputs (bias column included), padded
    directions = {ptr for ptr, *_ in calls}
    assert len(directions) < len(calls)  # each padded direction served several calls
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))
    assert analyzer_module._row_aligned(torch.zeros(2, 16, 32), 2).shape == (2, 16, 32)  # aligned: itself
    x = torch.randn(3, 5, 7)
    out = analyzer_module._row_aligned(x, 2)
    assert out.shape == (3, 16, 16) and torch.equal(out[:, :5, :7], x)
    assert not out[:, 5:].any() and not out[..., 7:].any()


def test_directions_are_prepared_once_per_group_not_per_block(monkeypatch):
    """Scored in several blocks of training examples, each group's directions are still padded (and cast to
    score_dtype) once: the number of direction paddings does not grow with the number of blocks."""
    model, data, run = _float32_run()
    queries = Subset(data, range(8))
    monkeypatch.setattr(analyzer_module.SourceAnalyzer, "_aligns_rows", lambda self, x: True)
    real = analyzer_module._row_aligned
    paddings = []
    monkeypatch.setattr(analyzer_module, "_row_aligned",
                        lambda x, dims: (paddings.append(dims), real(x, dims))[1])

    def direction_paddings(score_block):
        paddings.clear()
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=8,
                                     progress=False, score_block=score_block, score_dtype=torch.bfloat16)
        analyzer.fit(data)
        scores = analyzer.pairwise_scores(queries, data)
        return paddings.count(2), scores

    one, whole = direction_paddings(None)  # 40 examples: one block
    many, blocked = direction_paddings(8)  # five blocks
    assert one > 0 and many == one, (one, many)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))
