"""sample_labels: the Fisher's label sampler (inverse CDF) draws from softmax(logits)."""
import pytest
import torch

import source_fast as sf


def test_sample_labels_matches_softmax_frequencies():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    rows = 40_000
    draws = sf.sample_labels(logits.repeat(rows, 1), generator=gen).view(rows, 2)
    for r in range(2):
        freq = torch.bincount(draws[:, r], minlength=5).double() / rows
        p = logits[r].double().softmax(-1)
        # 5 standard errors of a binomial proportion: fails for a wrong distribution, passes by chance ~never
        assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / rows).sqrt() + 1e-12), (freq, p)


def test_sample_labels_never_draws_impossible_classes_and_keeps_shape():
    logits = torch.full((3, 7, 11), float("-inf"))
    logits[..., 4] = 0.0
    logits[0, :, 9] = 1.0
    labels = sf.sample_labels(logits, generator=torch.Generator().manual_seed(1))
    assert labels.shape == (3, 7) and labels.dtype == torch.int64
    assert set(labels[1:].flatten().tolist()) == {4}
    assert set(labels[0].flatten().tolist()) <= {4, 9}


def test_sample_labels_seeded_by_global_rng_and_float64():
    logits = torch.randn(50, 13, dtype=torch.float64)
    torch.manual_seed(3)
    a = sf.sample_labels(logits)
    torch.manual_seed(3)
    assert torch.equal(a, sf.sample_labels(logits))
    assert int(a.max()) < 13 and int(a.min()) >= 0


@pytest.mark.parametrize("bad, err, match", [
    (torch.zeros(3, 0), ValueError, "at least one class"),
    (torch.zeros(3, 4, dtype=torch.long), TypeError, "floating point"),
    ([0.1, 0.2], ValueError, "logits must be a tensor"),
])
def test_sample_labels_rejects_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        sf.sample_labels(bad)


@pytest.mark.parametrize("extreme", [0.0, 1.0 - 2**-24, 1.0], ids=["u=0", "u->1", "u=1"])
def test_sample_labels_extreme_uniforms_still_draw_possible_classes(monkeypatch, extreme):
    """The two-level search at its edges: u = 0 and u at the top of the range (where rounding in the block
    sums could point past a block's mass; u = 1 itself is outside torch.rand's range but is what u·total
    can round to) land on classes of positive probability, for every position of the possible class
    (first, inside a block, last, in the padded last block) and a float64 input."""
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full_like(real_rand(*shape, **kw), extreme))
    for classes, dtype in ((1000, torch.float32), (11, torch.float64), (1, torch.float32)):
        for possible in sorted({0, classes // 2, classes - 1}):
            logits = torch.full((3, classes), float("-inf"), dtype=dtype)
            logits[:, possible] = torch.tensor([0.0, 50.0, -50.0], dtype=dtype)
            assert set(sf.sample_labels(logits).tolist()) == {possible}, (classes, possible)
        mixed = torch.randn(64, classes, dtype=dtype) * 20
        mixed[:, ::3] = float("-inf")
        mixed[:, -1] = 0.0  # at least one possible class
        drawn = sf.sample_labels(mixed)
        assert torch.isfinite(mixed.gather(1, drawn[:, None])).all()
