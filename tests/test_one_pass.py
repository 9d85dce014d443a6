"""SOURCE with one training pass per checkpoint (pairwise_scores without a prior fit()).

The curvature's covariance pass keeps the true-label rows of the same forward (Task.compute_train_loss_pair,
or the rows themselves for the empirical Fisher); segments are fitted last to first and each is scored
right after its fit. Everything here compares against fit() + pairwise_scores(), the path with separate
passes, which the oracle tests pin down."""
import logging
import re

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import source_fast as sf
from source_fast import _config, io
from source_fast.ekfac import source_operators
from source_fast.walk import SegmentByStepWalk, WalkPlan, rotated_walk

from _models import ClassificationTask, PairedClassificationTask, classification_data, mlp, train_run

F64 = torch.float64


@pytest.fixture(scope="module")
def run3():
    data = classification_data(n=24)
    model = mlp()
    ckpts, steps, lrs = train_run(model, data, steps=30, every=5, lr=0.3, momentum=0.5)
    return model, data, (ckpts, steps, lrs)


def _scores(model, data, run, *, task, fit_first, method="source", fisher="sampled", dtype=F64, **kw):
    """(scores, forward passes of the model, analyzer)."""
    ckpts, steps, lrs = run
    model = model.to(dtype)
    x, y = data.tensors
    data = TensorDataset(x.to(dtype), y)
    run = sf.TrainingRun([{k: v.to(dtype) for k, v in c.items()} for c in ckpts], steps, lr=lrs, momentum=0.5,
                         num_segments=3)
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        analyzer = sf.SourceAnalyzer(model, task, run, method=method, fisher=fisher, batch_size=7, progress=False,
                                     **kw)
        queries = Subset(data, range(5))
        if fit_first:
            analyzer.fit(data)
        scores = analyzer.pairwise_scores(queries, data)
    finally:
        handle.remove()
        model.to(F64)
    return scores, len(forwards), analyzer


BATCHES = 4  # 24 examples in batches of 7
QUERY_BATCHES = 1


@pytest.mark.parametrize("method,fisher,units", [("source", "sampled", 6), ("source", "empirical", 6),
                                                  ("fast_source", "sampled", 3)])
def test_one_pass_equals_separate_passes_with_half_the_forwards(run3, method, fisher, units):
    model, data, run = run3
    task = PairedClassificationTask()
    two, forwards_two, fitted = _scores(model, data, run, task=task, fit_first=True, method=method, fisher=fisher)
    one, forwards_one, analyzer = _scores(model, data, run, task=task, fit_first=False, method=method, fisher=fisher)
    # Same factors bit for bit (same batches, same label seeds), scores up to the order of the segment sum.
    for seg, ref in zip(analyzer.blocks, fitted.blocks):
        for name, block in seg.items():
            for key in ("q_a", "q_s", "lam"):
                assert torch.equal(getattr(block, key), getattr(ref[name], key)), (seg, name, key)
    assert torch.allclose(one, two, rtol=1e-12, atol=1e-14 * two.abs().max().item())
    # Separate passes: covariance (the eigen-correction reuses its rows) + scoring per unit; one pass: covariance.
    assert forwards_two == 2 * units * BATCHES + QUERY_BATCHES
    assert forwards_one == units * BATCHES + QUERY_BATCHES


def test_one_pass_in_float32_matches_separate_passes(run3):
    model, data, run = run3
    task = PairedClassificationTask()
    two, _, _ = _scores(model, data, run, task=task, fit_first=True, dtype=torch.float32)
    one, _, _ = _scores(model, data, run, task=task, fit_first=False, dtype=torch.float32)
    assert one.dtype == torch.float32
    assert torch.allclose(one, two, rtol=1e-5, atol=1e-6 * two.abs().max().item())


@pytest.mark.parametrize("budget", [0, 5000, 2**30])
def test_rows_beyond_the_budget_are_scored_by_a_pass_of_their_own(run3, monkeypatch, caplog, budget):
    """Rows kept within SOURCE_FAST_ROW_CACHE_MIB: a prefix of batches common to a segment's members is scored
    from them, the rest by a pass of its own (a budget that holds the first batch), or the whole
    segment when nothing fits (0: the separate-pass schedule). Always the same scores. (5000 bytes, 2500 per
    checkpoint: each keeps its first batch of 7 examples, 1064 bytes of rows for the fit and 448 for scoring.)"""
    model, data, run = run3
    task = PairedClassificationTask()
    two, _, _ = _scores(model, data, run, task=task, fit_first=True)
    monkeypatch.setattr(_config, "row_cache_bytes", lambda: budget)
    with caplog.at_level(logging.INFO, logger="source_fast"):
        one, forwards, _ = _scores(model, data, run, task=task, fit_first=False)
    assert torch.allclose(one, two, rtol=1e-12, atol=1e-14 * two.abs().max().item())
    if budget == 0:  # no rows kept at all: the separate-pass schedule
        assert "SOURCE_FAST_ROW_CACHE_MIB=0" in caplog.text
        assert forwards == 3 * 6 * BATCHES + QUERY_BATCHES  # covariance, eigen-correction and scoring passes
    elif budget == 5000:
        assert "the rest scored by a pass of its own" in caplog.text
        kept = [int(m) for m in re.findall(r": (\d+) of 24 training examples' rows kept", caplog.text)]
        assert kept == [7, 7, 7]  # one batch per checkpoint of every segment
        # Covariance passes; the eigen-correction and scoring passes each skip their one kept batch.
        assert forwards == 6 * BATCHES + 2 * 6 * (BATCHES - 1) + QUERY_BATCHES
    else:
        assert "pass of its own" not in caplog.text and forwards == 6 * BATCHES + QUERY_BATCHES


def test_without_a_loss_pair_the_sampled_fisher_takes_separate_passes(run3, caplog):
    model, data, run = run3
    with caplog.at_level(logging.INFO, logger="source_fast"):
        plain, forwards, _ = _scores(model, data, run, task=ClassificationTask(), fit_first=False)
    assert "compute_train_loss_pair" in caplog.text
    assert forwards == 2 * 6 * BATCHES + QUERY_BATCHES
    paired, _, _ = _scores(model, data, run, task=PairedClassificationTask(), fit_first=False)
    # The paired task draws its labels exactly as compute_train_loss(sample=True): the same scores.
    assert torch.allclose(plain, paired, rtol=1e-12, atol=1e-14 * plain.abs().max().item())


@pytest.mark.parametrize("bad,match", [(lambda loss: loss, "must return \\(sampled_loss, true_loss\\)"),
                                       (lambda loss: (loss, loss, loss), "of length 3"),
                                       (lambda loss: (loss, loss.reshape(1)), "scalar tensor .* compute_train_loss_pair")])
def test_a_malformed_loss_pair_is_named(run3, bad, match):
    model, data, run = run3

    class Bad(ClassificationTask):
        def compute_train_loss_pair(self, batch, model):
            return bad(self.compute_train_loss(batch, model, sample=True))

    with pytest.raises(TypeError, match=match):
        _scores(model, data, run, task=Bad(), fit_first=False)


def test_interrupted_one_pass_run_resumes_from_finished_segments(run3, tmp_path, monkeypatch):
    """Kill the run during the fit of the second segment it visits: the first one's factors and its share
    of the scores are stored (the partial sum), so the rerun neither refits nor rescores it and gives
    bitwise the uninterrupted scores."""
    model, data, run = run3
    task = PairedClassificationTask()
    reference, _, _ = _scores(model, data, run, task=task, fit_first=False, output_dir=tmp_path / "ref")
    out = tmp_path / "run"

    class Interrupt(Exception):
        pass

    calls = []

    class Dying(PairedClassificationTask):
        def compute_train_loss_pair(self, batch, model):
            calls.append(1)
            if len(calls) > 2 * BATCHES + 1:  # segment 2's two units done, then one batch of segment 1
                raise Interrupt
            return super().compute_train_loss_pair(batch, model)

    with pytest.raises(Interrupt):
        _scores(model, data, run, task=Dying(), fit_first=False, output_dir=out)
    partial = out / "scores" / "pairwise_source.partial.safetensors"
    _, meta = io.load_tensors(partial)
    assert meta["info"]["segments_done"] == [2]
    resumed, forwards, _ = _scores(model, data, run, task=task, fit_first=False, output_dir=out)
    assert torch.equal(resumed, reference)
    assert forwards == 4 * BATCHES + QUERY_BATCHES  # segments 1 and 0 only; segment 2 loaded
    assert not partial.exists()  # removed once the score store is complete
    again, forwards, _ = _scores(model, data, run, task=task, fit_first=False, output_dir=out)
    assert torch.equal(again, reference) and forwards == 0  # everything stored


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_segment_by_step_walk_is_rotated_walk_bit_for_bit(dtype):
    from test_source_math import _random_block

    blocks = [{"w": _random_block(5, 7, seed=s, dtype=dtype), "v": _random_block(3, 4, seed=10 + s, dtype=dtype)}
              for s in range(3)]
    operators = [source_operators(c) for c in (0.3, 1.1, 0.7)]
    u = {"w": torch.randn(6, 5, 7, dtype=dtype), "v": torch.randn(6, 3, 4, dtype=dtype)}
    want = rotated_walk({k: x.clone() for k, x in u.items()}, blocks, operators,
                        plan=WalkPlan(blocks, operators, dtype), queries_innermost={(1, "w")})
    walk = SegmentByStepWalk({k: x.clone() for k, x in u.items()}, dtype)
    for seg in (2, 1, 0):
        got = walk.step(seg, blocks[seg], operators[seg], queries_innermost={"w"} if seg == 1 else ())
        for name in u:
            assert torch.equal(got[name], want[seg][name]), (seg, name)
    skipping = SegmentByStepWalk({k: x.clone() for k, x in u.items()}, dtype)
    skipping.step(2, blocks[2], operators[2])
    with pytest.raises(ValueError, match="last to first"):
        skipping.step(0, blocks[0], operators[0])


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_segment_by_step_walk_writes_into_recycled_buffers(dtype):
    """W handed back after use is where the next step writes (one buffer per layer over the whole walk), with
    its padding lanes zeroed again, and the values stay rotated_walk's bit for bit."""
    from source_fast import _extension
    from test_source_math import _random_block

    blocks = [{"w": _random_block(5, 7, seed=s, dtype=dtype), "v": _random_block(3, 4, seed=10 + s, dtype=dtype)}
              for s in range(3)]
    operators = [source_operators(c) for c in (0.3, 1.1, 0.7)]
    u = {"w": torch.randn(6, 5, 7, dtype=dtype), "v": torch.randn(6, 3, 4, dtype=dtype)}
    every = {(seg, "w") for seg in range(3)}
    want = rotated_walk({k: x.clone() for k, x in u.items()}, blocks, operators,
                        plan=WalkPlan(blocks, operators, dtype), queries_innermost=every)
    walk = SegmentByStepWalk({k: x.clone() for k, x in u.items()}, dtype)
    first = None
    for seg in (2, 1, 0):
        got = walk.step(seg, blocks[seg], operators[seg], queries_innermost={"w"})
        assert _extension.is_queries_innermost(got["w"])
        assert first is None or got["w"].data_ptr() == first
        first = got["w"].data_ptr()
        for name in u:
            assert torch.equal(got[name], want[seg][name]), (seg, name)
        padded = torch.as_strided(got["w"], (5, 7, got["w"].stride(2)), (got["w"].stride(1), got["w"].stride(2), 1))
        assert not padded[..., 6:].any()
        padded.fill_(float("nan"))  # what the caller leaves in it, padding included
        walk.recycle(got)  # the [Q, O, I] "v" is not in that layout: dropped, not reused


def test_interrupted_scoring_after_fit_resumes_from_finished_segments(run3, tmp_path):
    """After fit(), segments are scored one at a time and the running sum stored after each: a run killed
    while scoring the second segment resumes from the first one's share, bitwise the uninterrupted scores."""
    model, data, run = run3
    reference, _, _ = _scores(model, data, run, task=ClassificationTask(), fit_first=True,
                              output_dir=tmp_path / "ref")
    out = tmp_path / "run"
    ckpts, steps, lrs = run
    sf.SourceAnalyzer(model, ClassificationTask(), sf.TrainingRun(ckpts, steps, lr=lrs, momentum=0.5, num_segments=3),
                      batch_size=7, progress=False, output_dir=out).fit(data)

    class Interrupt(Exception):
        pass

    class Dying(ClassificationTask):
        calls = 0

        def compute_train_loss(self, batch, model, sample=False):
            Dying.calls += 1
            if Dying.calls > 2 * BATCHES + 1:  # segment 2's two checkpoints scored, then one batch of segment 1
                raise Interrupt
            return super().compute_train_loss(batch, model, sample=sample)

    with pytest.raises(Interrupt):
        _scores(model, data, run, task=Dying(), fit_first=True, output_dir=out)
    partial = out / "scores" / "pairwise_source.partial.safetensors"
    _, meta = io.load_tensors(partial)
    assert meta["info"]["segments_done"] == [2]
    resumed, forwards, _ = _scores(model, data, run, task=ClassificationTask(), fit_first=True, output_dir=out)
    assert torch.equal(resumed, reference)
    assert forwards == 4 * BATCHES + QUERY_BATCHES  # segments 1 and 0 only; nothing refitted
    assert not partial.exists()


def test_killed_while_writing_score_blocks_finishes_from_the_stored_sum(run3, tmp_path, monkeypatch):
    """All segments scored, the run dies after the first of several score blocks: the rerun writes the
    remaining blocks from the stored sum, with no pass over any data."""
    from source_fast.analyzer import SourceAnalyzer

    model, data, run = run3
    task = PairedClassificationTask()
    reference, _, _ = _scores(model, data, run, task=task, fit_first=False, score_block=7)
    out = tmp_path / "run"
    emit = SourceAnalyzer._emit

    def dying_emit(self, store, b, block):
        if b == 1:
            raise KeyboardInterrupt
        return emit(self, store, b, block)

    monkeypatch.setattr(SourceAnalyzer, "_emit", dying_emit)
    with pytest.raises(KeyboardInterrupt):
        _scores(model, data, run, task=task, fit_first=False, output_dir=out, score_block=7)
    monkeypatch.setattr(SourceAnalyzer, "_emit", emit)
    _, meta = io.load_tensors(out / "scores" / "pairwise_source.partial.safetensors")
    assert meta["info"]["segments_done"] == [0, 1, 2]
    resumed, forwards, _ = _scores(model, data, run, task=task, fit_first=False, output_dir=out, score_block=7)
    assert forwards == 0
    assert torch.equal(resumed, reference)


def test_one_pass_over_a_fit_stored_by_an_earlier_run(run3, tmp_path):
    """Factors stored by fit() in an earlier process: every segment is loaded and scored by its own pass."""
    model, data, run = run3
    task = PairedClassificationTask()
    reference, _, _ = _scores(model, data, run, task=task, fit_first=True)
    ckpts, steps, lrs = run
    first = sf.SourceAnalyzer(model, task, sf.TrainingRun(ckpts, steps, lr=lrs, momentum=0.5, num_segments=3),
                              batch_size=7, progress=False, output_dir=tmp_path)
    first.fit(data)
    scores, forwards, _ = _scores(model, data, run, task=task, fit_first=False, output_dir=tmp_path)
    assert forwards == 6 * BATCHES + QUERY_BATCHES  # scoring passes only: nothing refitted
    assert torch.allclose(scores, reference, rtol=1e-12, atol=1e-14 * reference.abs().max().item())


def test_conv_rows_are_kept_as_their_gradients_or_the_layer_input(monkeypatch):
    """The row caches keep a conv layer's per-example gradients where they are at most half the bytes of its rows
    (rows.Formed: 3 × 10 values per example here), else its module input instead of its patch rows (rows.Rebuilt,
    36 against 90 values per 6×6 image), and read them back when used: a budget that holds every batch in the
    first form but not in the second scores from one pass per checkpoint; each larger form needs more passes.
    Always the scores of the separate-pass schedule."""
    from _models import TinyCNN

    from source_fast import analyzer as analyzer_module
    from source_fast import rows as rows_module

    data = classification_data(n=16, image=True)
    torch.manual_seed(1)
    model = TinyCNN().double()
    ckpts, steps, lrs = train_run(model, data, steps=12, every=4, lr=0.2)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    members = max(len(s.checkpoints) for s in run.segments)
    # Bytes per example (float64), both caches: the conv's G_n (3 × 10) or its a (the 1×6×6 input; patches 9 × 10)
    # and g (9 × 3), fc a (28) and g (3) for the fit, and the conv's true-label G_n (30) or g (27) and fc's g (3)
    # for scoring (the a are shared).
    formed, compact = 8 * (30 + 28 + 3 + 30 + 3), 8 * (36 + 27 + 28 + 3 + 30)
    monkeypatch.setattr(_config, "row_cache_bytes", lambda: members * 16 * (formed + compact) // 2)  # between

    def scores(fit_first):
        forwards = []
        handle = model.register_forward_hook(lambda *_: forwards.append(1))
        try:
            analyzer = sf.SourceAnalyzer(model, PairedClassificationTask(), run, batch_size=7, progress=False)
            if fit_first:
                analyzer.fit(data)
            return analyzer.pairwise_scores(Subset(data, range(3)), data), len(forwards)
        finally:
            handle.remove()

    def assert_same(scores):
        assert torch.allclose(scores, two, rtol=1e-12, atol=1e-14 * two.abs().max().item())

    two, _ = scores(fit_first=True)
    made = []
    kept_rows = rows_module.kept_rows
    monkeypatch.setattr(analyzer_module, "kept_rows", lambda *args: made.append(args[2]) or kept_rows(*args))
    one, forwards = scores(fit_first=False)
    assert_same(one)
    assert made and all(formed_names == {"conv"} for formed_names in made)
    assert forwards == len(ckpts) * 3 + 1  # one pass per checkpoint (3 batches), one query batch
    monkeypatch.setattr(analyzer_module, "formed_layers", lambda rows, sources: set())  # the module input kept
    again, forwards_compact = scores(fit_first=False)
    assert forwards_compact > forwards
    assert_same(again)
    # patch rows kept (and the conv, of one input channel, not in the covariance pass's Rebuilt form)
    monkeypatch.setattr(rows_module, "compact_rows", lambda rows, sources: rows)
    monkeypatch.setattr(sf.modules.Capture, "_one_channel_forms_apply", lambda *args: False)
    monkeypatch.setattr(rows_module, "_compact_nbytes", lambda a, source: rows_module._nbytes(a))
    again, forwards_patches = scores(fit_first=False)
    assert forwards_patches > forwards_compact
    assert_same(again)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_gradients_kept_or_recomputed_give_bitwise_the_same_factors_and_scores(monkeypatch, layout):
    """A float32 CNN whose conv layers the row caches keep as G_n (rows.Formed: a 3×3 conv's 36 positions and a
    depthwise conv's groups): the eigen-correction from kept G_n and from a recomputing pass are bitwise the same
    (the pass forms the same G_n, rows.with_formed_gradients), whatever SOURCE_FAST_ROW_CACHE_MIB keeps; one-pass
    scores equal the separate passes' within float32 summation order."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1, groups=3),
                          nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 3)).to(memory_format=layout)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 2, 6, 6, generator=gen), torch.randint(0, 3, (20,), generator=gen))
    ckpts, steps, lrs = train_run(model, data, steps=8, every=2, lr=0.2)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    from source_fast import rows as rows_module

    kept, make = [], rows_module.kept_rows
    monkeypatch.setattr("source_fast.analyzer.kept_rows", lambda *args: kept.append(args[2]) or make(*args))

    def fit(budget):
        monkeypatch.setattr(_config, "row_cache_bytes", lambda: budget)
        analyzer = sf.SourceAnalyzer(model, PairedClassificationTask(), run, batch_size=6, progress=False)
        return analyzer.fit(data).blocks

    recomputed, kept_all = fit(0), fit(2**30)
    assert kept and all(formed == {"0", "2[0]", "2[1]", "2[2]"} for formed in kept)
    for seg, ref in zip(kept_all, recomputed):
        for name, block in seg.items():
            assert torch.equal(block.lam, ref[name].lam), name
    monkeypatch.setattr(_config, "row_cache_bytes", lambda: 2**30)
    queries = Subset(data, range(4))
    analyzer = sf.SourceAnalyzer(model, PairedClassificationTask(), run, batch_size=6, progress=False)
    one = analyzer.pairwise_scores(queries, data)
    two = sf.SourceAnalyzer(model, PairedClassificationTask(), run, batch_size=6, progress=False).fit(data)
    torch.testing.assert_close(one, two.pairwise_scores(queries, data), rtol=1e-5, atol=1e-5 * one.abs().max().item())
