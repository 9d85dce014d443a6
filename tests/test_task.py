"""sample_labels: the Fisher's label sampler (inverse CDF) draws from softmax(logits). nll_pair: the
sampled-label and true-label losses from one softmax, against F.cross_entropy (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

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


def _reference_pair(logits, labels, seed):
    """nll_pair by its definition: sample_labels' draws (same seed) and F.cross_entropy, in float64."""
    flat = logits.reshape(-1, logits.shape[-1])
    torch.manual_seed(seed)
    drawn = sf.sample_labels(flat.detach()).masked_fill(labels.reshape(-1) == -100, -100)
    ref = flat.double()
    return (F.cross_entropy(ref, drawn, ignore_index=-100, reduction="sum"),
            F.cross_entropy(ref, labels.reshape(-1), ignore_index=-100, reduction="sum")), drawn


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-13), (torch.float32, 2e-6), (torch.bfloat16, 2e-6)])
def test_nll_pair_matches_cross_entropy_values_and_gradients(dtype, rtol):
    logits = (torch.randn(3, 7, 41, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 41, (3, 7))
    labels[0, :3] = -100  # rows that are not scored: no loss, no gradient, no draw
    labels[2, -1] = -100
    torch.manual_seed(5)
    pair = sf.nll_pair(logits, labels)
    want, drawn = _reference_pair(logits, labels, seed=5)
    assert drawn.view(3, 7)[0, :3].eq(-100).all()
    for ours, ref in zip(pair, want):
        assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=0)
        scale = 2.5  # a non-unit upstream gradient scales every row
        got, = torch.autograd.grad(scale * ours, logits, retain_graph=True)
        exp, = torch.autograd.grad(scale * ref, logits, retain_graph=True)
        assert got.dtype == dtype
        # fp64 oracle: the reference's gradient is taken through a float64 copy, so it is exact to ~1e-16
        tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(got.double(), exp.double(), rtol=0, atol=tol * scale)
        assert got.view(3, 7, 41)[0, :3].eq(0).all()


def test_nll_pair_is_exact_for_a_label_far_below_the_top_one():
    """−log p underflows in fp32 once a label is ≳ 87 nats below the top class: those rows fall back to
    logsumexp − logit and stay finite and exact, by the CPU path (host check) and the GPU path (no sync)."""
    from source_fast.task import _nll_rows

    logits = torch.zeros(4, 6)
    logits[:, 0] = torch.tensor([0.0, 50.0, 120.0, 300.0])
    labels = torch.full((4,), 3)
    want = F.cross_entropy(logits.double(), labels, reduction="none")
    _, true = sf.nll_pair(logits, labels, sampled=False)
    torch.testing.assert_close(true.double(), want.sum(), rtol=1e-6, atol=0)
    valid = torch.ones(4, dtype=torch.bool)
    for host_sync in (True, False):
        rows = _nll_rows(logits, logits.softmax(-1), labels, valid, host_sync=host_sync)
        torch.testing.assert_close(rows.double(), want, rtol=1e-6, atol=1e-6)


def test_nll_pair_draws_like_sample_labels_and_sampled_false_draws_nothing():
    logits = torch.randn(30, 1000)
    labels = torch.randint(0, 1000, (30,))
    torch.manual_seed(9)
    sf.nll_pair(logits, labels)
    after_pair = torch.rand(1)
    torch.manual_seed(9)
    sf.sample_labels(logits)
    assert torch.equal(after_pair, torch.rand(1))  # the same RNG use as one sample_labels call
    torch.manual_seed(9)
    first_draw = torch.rand(1)
    torch.manual_seed(9)
    sampled, true = sf.nll_pair(logits, labels, sampled=False)
    assert sampled is None and torch.equal(torch.rand(1), first_draw)  # the RNG was not touched
    torch.testing.assert_close(true.double(), F.cross_entropy(logits.double(), labels, reduction="sum"),
                               rtol=2e-6, atol=0)


@pytest.mark.parametrize("logits, labels, err, match", [
    (torch.zeros(3, 4), torch.zeros(4, dtype=torch.long), ValueError,
     r"labels must be an integer tensor of shape logits.shape\[:-1\] = \(3,\)"),
    (torch.zeros(3, 4), torch.zeros(3), ValueError, "integer tensor"),
    (torch.zeros(3, 4), torch.tensor([0, 4, 1]), ValueError, r"\[0, 4\) or equal ignore_index=-100"),
    (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), TypeError, "floating point"),
    (torch.zeros(3, 0), torch.zeros(3, dtype=torch.long), ValueError, "at least one class"),
    (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long, device="meta"), ValueError,
     "all tensors must be on one device, got logits on cpu, labels on meta"),
])
def test_nll_pair_rejects_bad_input(logits, labels, err, match):
    with pytest.raises(err, match=match):
        sf.nll_pair(logits, labels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_pair_on_cuda_matches_cpu(dtype):
    """On CUDA (no host sync: the logsumexp path for every row) the losses and gradients match the CPU's,
    and the draws come from the CUDA RNG without leaving the device."""
    logits = (torch.randn(64, 40, 1000) * 3).to(dtype)
    labels = torch.randint(0, 1000, (64, 40))
    labels[:, -1] = -100
    logits[0, 0, 7] = 300.0  # one row whose true label underflows −log p in fp32
    labels[0, 0] = 3
    cpu = logits.clone().requires_grad_(True)
    gpu = logits.cuda().requires_grad_(True)
    _, want = sf.nll_pair(cpu, labels, sampled=False)
    sampled, true = sf.nll_pair(gpu, labels.cuda())
    assert sampled.device.type == "cuda" and torch.isfinite(sampled)
    torch.testing.assert_close(true.cpu(), want, rtol=1e-5, atol=0)
    got, = torch.autograd.grad(true, gpu)
    exp, = torch.autograd.grad(want, cpu)
    torch.testing.assert_close(got.cpu().float(), exp.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_nll_pair_equals_nll_pair_of_the_logits(dtype, tol, with_bias):
    """Losses, draws and the gradient with respect to the hidden states equal nll_pair's on the logits
    hidden @ weightᵀ + bias (one chunk: the same draws from the same RNG state), with ignored rows."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = torch.randn(41, 16, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(41, generator=gen, dtype=torch.float64).to(dtype) if with_bias else None
    labels = torch.randint(0, 41, (3, 7), generator=gen)
    labels[0, :2] = -100
    torch.manual_seed(4)
    ours = sf.linear_nll_pair(hidden, weight, labels, bias=bias)
    torch.manual_seed(4)
    logits = hidden @ weight.T + (bias if with_bias else 0)
    want = sf.nll_pair(logits, labels)
    for got, exp in zip(ours, want):
        torch.testing.assert_close(got, exp, rtol=tol, atol=0)
        g1, = torch.autograd.grad(2.5 * got, hidden, retain_graph=True)
        g2, = torch.autograd.grad(2.5 * exp, hidden, retain_graph=True)
        torch.testing.assert_close(g1, g2, rtol=tol, atol=tol * float(g2.abs().max()))
        assert g1.dtype == dtype and g1[0, :2].eq(0).all()


def test_linear_nll_pair_in_chunks_and_without_draws():
    """Chunks of rows give the same true loss and gradient as one chunk; sampled=False draws nothing and
    returns (None, true)."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 30, (50,), generator=gen)
    labels[::7] = -100
    _, whole = sf.linear_nll_pair(hidden, weight, labels, sampled=False)
    torch.manual_seed(2)
    first_draw = torch.rand(1)
    torch.manual_seed(2)
    none, chunked = sf.linear_nll_pair(hidden, weight, labels, sampled=False, chunk_rows=6)
    assert none is None and torch.equal(torch.rand(1), first_draw)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=0)
    g1, = torch.autograd.grad(chunked, hidden)
    g2, = torch.autograd.grad(whole, hidden)
    torch.testing.assert_close(g1, g2, rtol=1e-13, atol=1e-15)
    sampled, true = sf.linear_nll_pair(hidden, weight, labels, chunk_rows=6)
    assert torch.isfinite(sampled) and torch.allclose(true, whole, rtol=1e-13)


@pytest.mark.parametrize("kwargs, err, match", [
    ({"weight": torch.zeros(5, 3)}, ValueError, r"weight must be \[classes, 4\]"),
    ({"bias": torch.zeros(6)}, ValueError, r"bias must be \[5\]"),
    ({"labels": torch.zeros(2, 3, dtype=torch.long)}, ValueError, r"shape hidden.shape\[:-1\] = \(3,\)"),
    ({"labels": torch.tensor([0, 5, 1])}, ValueError, r"\[0, 5\) or equal ignore_index=-100"),
    ({"chunk_rows": 0}, ValueError, "chunk_rows must be an integer >= 1"),
    ({"weight": torch.zeros(5, 4, device="meta")}, ValueError, "got hidden on cpu, weight on meta"),
])
def test_linear_nll_pair_rejects_bad_input(kwargs, err, match):
    args = {"hidden": torch.zeros(3, 4), "weight": torch.zeros(5, 4), "labels": torch.zeros(3, dtype=torch.long)}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        sf.linear_nll_pair(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.gpu
def test_linear_nll_pair_on_cuda_matches_cpu():
    """On CUDA (no host syncs) the true loss and its gradient match the CPU's; the sampled loss is finite."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 64, generator=gen)
    weight = torch.randn(1000, 64, generator=gen) / 8
    labels = torch.randint(0, 1000, (300,), generator=gen)
    labels[::9] = -100
    cpu = hidden.clone().requires_grad_(True)
    gpu = hidden.cuda().requires_grad_(True)
    _, want = sf.linear_nll_pair(cpu, weight, labels, sampled=False)
    sampled, true = sf.linear_nll_pair(gpu, weight.cuda(), labels.cuda(), chunk_rows=128)
    assert torch.isfinite(sampled)
    torch.testing.assert_close(true.cpu(), want, rtol=1e-5, atol=0)
    got, = torch.autograd.grad(true, gpu)
    exp, = torch.autograd.grad(want, cpu)
    torch.testing.assert_close(got.cpu(), exp, rtol=1e-4, atol=1e-5)


def _draws(device):
    return torch.rand(4, device=device), torch.multinomial(torch.ones(10, device=device), 3), torch.randn(2, device=device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sampled_labels_are_seeded_as_torch_manual_seed_seeds_them(device):
    """The fit seeds each sampled batch's draws (analyzer._seed_draws) on the generators they use: the same draws as
    torch.manual_seed with that seed, so stored factors and scores do not depend on which of the two seeded them."""
    from source_fast.analyzer import _seed_draws

    for seed in (0, 12345, 2**62 + 7):
        torch.manual_seed(seed)
        want = _draws(device)
        torch.manual_seed(999)  # another state first
        _seed_draws(torch.device(device), seed)
        got = _draws(device)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), seed
