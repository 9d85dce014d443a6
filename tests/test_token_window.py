"""Padded token positions cut from the rows (`modules._padding_windows`): positions that the attention mask
removes from every example of a batch, at its start or end, leave a layer's rows when its g is exactly zero
there; the scores do not change."""
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast import modules
from source_fast.modules import _padding_windows

from _models import LM_SEQ, TokenDataset, lm_checkpoints, padded_tokens, tiny_gpt2

pytest.importorskip("transformers")


def _rows(b=3, t=10, i=4, o=5, zero_outside=(2, 6)):
    a, g = torch.randn(b, t, i), torch.randn(b, t, o)
    lo, hi = zero_outside
    a[:, :lo], a[:, hi:], g[:, :lo], g[:, hi:] = 0, 0, 0, 0
    return a, g


def _mask(b=3, t=10, window=(2, 6)):
    mask = torch.zeros(b, t, dtype=torch.long)
    mask[0, window[0]:window[1]] = 1  # one example spans the window, the others less
    mask[1:, window[0]:window[0] + 1] = 1
    return mask


def test_window_cuts_left_and_right_padding_where_g_is_zero():
    rows = {"x": _rows(), "y": _rows()}
    rows["y"][1][0, 7, 0] = 1e-30  # a nonzero g outside the window: S would lose it, so y is kept whole
    windows = _padding_windows(_mask(), rows)
    assert windows == {"x": (2, 6), "y": None}


@pytest.mark.parametrize("case", ["no mask", "all kept", "cut too small", "nothing kept", "not token rows"])
def test_window_keeps_everything_when_there_is_nothing_worth_cutting(case):
    rows = {"x": _rows(zero_outside=(0, 10))}
    mask = torch.ones(3, 10, dtype=torch.long)
    if case == "no mask":
        mask = None
    elif case == "cut too small":  # 1 of 12 positions: less than _MIN_TRIM_FRACTION, the copy would cost more
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[:, -1] = 0
        rows = {"x": _rows(t=12, zero_outside=(0, 11))}
    elif case == "nothing kept":
        mask[:] = 0
    elif case == "not token rows":  # e.g. a conv layer's positions: the mask does not apply
        mask = _mask()
        rows = {"x": (torch.zeros(3, 7, 4), torch.zeros(3, 7, 5))}
    assert _padding_windows(mask, rows) == {"x": None}


def _docs(seed=0):
    """8 documents of 2-3 tokens in a context of 6: the cut applies."""
    return padded_tokens(8, (2, 3), seed=seed)


def test_padded_to_a_fixed_length_scores_like_the_unpadded_batches():
    """Right padding to the model's context (6) against the same documents cut to their longest (3)
    positions: a causal LM's real positions do not see the padding, so with the empirical Fisher (no
    label draws, whose count would differ) every quantity is the same and the scores agree to rounding."""
    ids, mask = _docs()
    long = TokenDataset(ids, mask, with_labels=False)
    short = TokenDataset(ids[:, :3].contiguous(), mask[:, :3].contiguous(), with_labels=False)
    scores = []
    for data in (long, short):
        model = tiny_gpt2()
        ckpts, steps = lm_checkpoints(model, data, sf.CausalLMTask())
        run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)
        analyzer = sf.SourceAnalyzer(model, sf.CausalLMTask(), run, fisher="empirical", batch_size=4,
                                     progress=False)
        scores.append(analyzer.pairwise_scores(Subset(data, range(3)), data))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-9, atol=1e-12 * scores[1].abs().max().item())


def test_cutting_changes_no_score_and_happens(monkeypatch):
    """The sampled Fisher on the same padded data, cut and not cut: the same scores; the cut path ran
    (row windows shorter than the batch), for the sampled and the paired true-label rows."""
    ids, mask = _docs(seed=1)
    data = TokenDataset(ids, mask, with_labels=False)
    model = tiny_gpt2()
    ckpts, steps = lm_checkpoints(model, data, sf.CausalLMTask())
    run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)
    cut_lengths = []
    real_cut = modules._cut

    def spy(rows, window):
        out = real_cut(rows, window)
        cut_lengths.append(out.shape[1])
        return out

    def scores():
        return sf.SourceAnalyzer(model, sf.CausalLMTask(), run, batch_size=4,
                                 progress=False).pairwise_scores(Subset(data, range(3)), data)

    monkeypatch.setattr(modules, "_cut", spy)
    cut = scores()
    assert cut_lengths and max(cut_lengths) <= 3 < LM_SEQ
    monkeypatch.setenv("SOURCE_FAST_CUT_PADDING", "0")  # the rows stay whole
    cut_lengths.clear()
    whole = scores()
    assert set(cut_lengths) == {LM_SEQ}
    torch.testing.assert_close(cut, whole, rtol=1e-10, atol=1e-12 * whole.abs().max().item())


def test_bench_padding_smoke():
    """benchmarks/bench_padding.py --smoke: both modes run in fresh processes, their scores agree, nothing
    is written (smoke timings are not measurements)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    results = repo / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("padding_*")}
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_padding.py"), "--smoke", "--threads", "1"],
                          cwd=repo, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scores agree: True" in proc.stdout and "SMOKE" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("padding_*")} == before


@pytest.mark.parametrize("left", [False, True], ids=["right padding", "left padding"])
def test_every_scoring_entry_point_agrees_cut_or_whole(monkeypatch, left):
    """fit() then pairwise_scores, self_scores and top_k (the two-pass paths, the influence method) with
    padded positions cut and kept: the same results, for right and for left padding."""
    ids, mask = _docs(seed=2)
    if left:  # the same documents at the end of the context (GPT-2 then sees other positions: a new model)
        ids, mask = ids.flip(1), mask.flip(1)
    data = TokenDataset(ids, mask, with_labels=False)
    model = tiny_gpt2()
    ckpts, steps = lm_checkpoints(model, data, sf.CausalLMTask())
    run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)
    queries = Subset(data, range(3))
    results = {}
    for cut in ("1", "0"):
        monkeypatch.setenv("SOURCE_FAST_CUT_PADDING", cut)
        source = sf.SourceAnalyzer(model, sf.CausalLMTask(), run, batch_size=3, progress=False).fit(data)
        influence = sf.SourceAnalyzer(model, sf.CausalLMTask(), run, method="influence", batch_size=3,
                                      progress=False)
        results[cut] = (source.pairwise_scores(queries, data), source.self_scores(data),
                        source.top_k(queries, data, k=3)[1], influence.pairwise_scores(queries, data))
    for got, want in zip(results["1"], results["0"]):
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())
        else:
            assert torch.equal(got, want)
