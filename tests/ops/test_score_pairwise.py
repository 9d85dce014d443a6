"""score_pairwise: every available backend against the float64 reference (source_fast/reference/score.py)."""
import contextlib

import pytest
import torch

from _backends import (assert_fast_sm90_builds, at_thread_counts, backend_params, compile_for_gpu,
                       recording_lib_calls, require)
from _tolerances import assert_matches_oracle
from source_fast import ops, reference

BACKENDS = backend_params("cpu")
GPU_BACKENDS = backend_params("cuda")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
SHAPES = [  # (Q, N, T, I, O): sizes 1, odd primes, T = 1 and T > 1, I ≠ O both ways, I above the
    # interpreter's 64-wide tile, T above its 64-token block, Q above its 16-query block
    pytest.param(1, 1, 1, 1, 1, id="q1-n1-t1-i1-o1"),
    pytest.param(3, 7, 1, 41, 13, id="q3-n7-t1-i41-o13"),
    pytest.param(2, 7, 3, 41, 13, id="q2-n7-t3-i41-o13"),
    pytest.param(1, 3, 3, 13, 41, id="q1-n3-t3-i13-o41"),
    pytest.param(5, 3, 5, 80, 20, id="q5-n3-t5-i80-o20"),
    pytest.param(17, 2, 70, 17, 9, id="q17-n2-t70-i17-o9"),
]


def _inputs(q, n, t, i, o, dtype, device="cpu"):
    v = torch.randn(q, o, i, device=device).to(dtype)
    a = torch.randn(n, t, i, device=device).to(dtype)
    g = torch.randn(n, t, o, device=device).to(dtype)
    return v, a, g


def _check(backend, v, a, g, dtype):
    require(backend, "score_pairwise", {"v": v, "a": a, "g": g})
    got = ops.score_pairwise(v, a, g, backend=backend)
    oracle = reference.score_pairwise_ref(v, a, g)
    baseline = reference.score_pairwise_ref(v, a, g, upcast=False) if dtype in (torch.float16, torch.bfloat16) else None
    assert_matches_oracle(got, oracle, op="score_pairwise", backend=backend, dtype=dtype, baseline=baseline)
    return got, oracle


@pytest.mark.parametrize("q,n,t,i,o", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_score_pairwise_matches_oracle(backend, dtype, q, n, t, i, o):
    got, _ = _check(backend, *_inputs(q, n, t, i, o, dtype), dtype)
    assert got.dtype == torch.float32 and got.shape == (q, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_pairwise_rankings(backend):
    """Users act on rankings: Spearman ≥ 0.9999 with the oracle and identical top-10 per query."""
    v, a, g = _inputs(3, 64, 2, 13, 7, torch.float32)
    got, oracle = _check(backend, v, a, g, torch.float32)
    for qi in range(v.shape[0]):
        rank_got = got[qi].double().argsort().argsort().double()
        rank_ref = oracle[qi].argsort().argsort().double()
        spearman = torch.corrcoef(torch.stack([rank_got, rank_ref]))[0, 1].item()
        assert spearman >= 0.9999, f"query {qi}: Spearman {spearman}"
        top_got = set(got[qi].topk(10).indices.tolist())
        top_ref = set(oracle[qi].topk(10).indices.tolist())
        assert top_got == top_ref, f"query {qi}: top-10 differ: {sorted(top_got ^ top_ref)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_pairwise_strided_inputs(backend):
    """Non-contiguous views (a transposed query batch, a token-strided slice) are read correctly."""
    v = torch.randn(13, 41, 3).permute(2, 0, 1)  # [3, 13, 41], not contiguous
    a = torch.randn(5, 6, 41)[:, ::2]             # [5, 3, 41], token stride 2
    g = torch.randn(5, 3, 13)
    assert not v.is_contiguous() and not a.is_contiguous()
    _check(backend, v, a, g, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_pairwise_deterministic(backend):
    v, a, g = _inputs(17, 3, 5, 80, 20, torch.float32)
    require(backend, "score_pairwise", {"v": v, "a": a, "g": g})
    runs = [ops.score_pairwise(v, a, g, backend=backend, deterministic=True) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("q,n,t,o,i,layout", [
    (5, 37, 4, 25, 32, "contiguous"),     # rows read in place; a partial block of 12 rows of g
    (13, 40, 3, 30, 1024, "contiguous"),  # G rows formed and contracted in several chunks of o
    (6, 19, 5, 14, 48, "strided"),        # non-contiguous V, a and g: packed copies
    (40, 33, 2, 300, 200, "contiguous"),  # V of 9.6 MB and 4T < Q: the "lanes" layout, one G row at a time
    (40, 33, 8, 301, 201, "contiguous"),  # lanes, T >= 8: G rows formed in groups (the last partial), odd I
    (40, 37, 9, 299, 203, "strided"),     # the same from strided inputs
], ids=["in-place", "o-chunks", "strided", "lanes", "lanes-row-groups", "lanes-row-groups-strided"])
def test_score_pairwise_cpu_materialized_layouts(q, n, t, o, i, layout):
    """The materialised kernel's paths ("rows" layout: in-place rows, padded copies, several row chunks
    per block; the "lanes" layout for a large V and few tokens):
    each equals the float64 oracle and is bitwise the same for 1 and 2 threads."""
    v, a, g = _inputs(q, n, t, i, o, torch.float32)
    if layout == "strided":
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
        a = a.transpose(0, 1).contiguous().transpose(0, 1)
        g = torch.randn(o, n, t).permute(1, 2, 0)
        assert not (v.is_contiguous() or a.is_contiguous() or g.is_contiguous())
    require("cpu", "score_pairwise", {"v": v, "a": a, "g": g})
    runs = at_thread_counts(lambda: ops.score_pairwise(v, a, g, backend="cpu"))
    assert torch.equal(runs[0], runs[1])
    assert_matches_oracle(runs[0], reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="cpu",
                          dtype=torch.float32)


def test_density_estimate_is_exact_on_small_batches_and_close_on_large():
    """The sparse-g choice reads the union density of g over at most DENSITY_SAMPLE strided examples."""
    from source_fast import _extension

    gen = torch.Generator().manual_seed(3)
    small = torch.randn(_extension.DENSITY_SAMPLE, 3, 50, generator=gen)
    small[:, :, :20] = 0
    assert _extension._density(small) == pytest.approx(30 / 50)
    big = torch.randn(4096, 2, 64, generator=gen) * (torch.rand(4096, 1, 64, generator=gen) < 0.4)
    exact = float((big != 0).any(1).float().mean())
    assert abs(_extension._density(big) - exact) < 0.05


@pytest.mark.parametrize("q,n,o,i,density,layout", [
    (33, 300, 29, 41, 0.4, "contiguous"),  # V packed per call
    (40, 257, 64, 33, 0.5, "queries-innermost"),  # V read in place (the pipeline's layout)
    (35, 129, 40, 17, 0.0, "contiguous"),  # all of g zero
], ids=["packed", "in-place", "all-zero"])
def test_score_pairwise_cpu_sparse_g(q, n, o, i, density, layout):
    """With one token and mostly-zero g (ReLU-gated layers) the CPU backend contracts only the nonzero
    g[n, o]: equal to the float64 oracle, bitwise the same for 1 and 2 threads."""
    from source_fast import _extension

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(q, o, i, generator=gen)
    a = torch.randn(n, 1, i, generator=gen)
    g = torch.randn(n, 1, o, generator=gen) * (torch.rand(n, 1, o, generator=gen) < density)
    if layout == "queries-innermost":
        v = _extension._sparse_layout(v)
        assert v.stride(0) == 1
    require("cpu", "score_pairwise", {"v": v, "a": a, "g": g})
    with recording_lib_calls() as recorded:
        runs = at_thread_counts(lambda: ops.score_pairwise(v, a, g, backend="cpu"))
    calls = [name for name, _ in recorded]
    assert calls.count("score_pairwise_sparse_g_cpu") == 2, calls  # one call per run (after any self-test)
    assert torch.equal(runs[0], runs[1])
    assert_matches_oracle(runs[0], reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="cpu",
                          dtype=torch.float32)


def test_score_pairwise_sparse_g_kernel_sums_tokens():
    """The sparse-g kernel also handles T > 1 (each token's nonzero g, summed per example)."""
    from source_fast import _extension

    gen = torch.Generator().manual_seed(1)
    v, a = torch.randn(5, 23, 19, generator=gen), torch.randn(37, 3, 19, generator=gen)
    g = torch.randn(37, 3, 23, generator=gen) * (torch.rand(37, 3, 23, generator=gen) < 0.3)
    require("cpu", "score_pairwise", {"v": v, "a": a, "g": g})
    out = torch.empty(5, 37)
    _extension._lib().score_pairwise_sparse_g_cpu(
        v.data_ptr(), *v.stride(), a.data_ptr(), *a.stride(), g.data_ptr(), *g.stride(), 0, 5, 37, 3, 23, 19,
        out.data_ptr(), *out.stride(), 0, 2)
    assert_matches_oracle(out, reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="cpu",
                          dtype=torch.float32)


@pytest.mark.parametrize("n,t,strided", [(300, 2, False), (1100, 3, True), (37, 2, False)],
                         ids=["t2", "t3-strided-a-blocks", "t2-few-examples"])
def test_score_pairwise_cpu_sparse_g_grouped_tokens(n, t, strided):
    """T > 1 with the same ReLU pattern on every token (a segment's stacked checkpoints): the dispatcher
    picks the sparse kernel by the fraction of (n, o) with any nonzero g, which forms one row of G_n per
    such entry; equal to the float64 oracle, bitwise the same for 1 and 2 threads, a read in place or
    strided, several example blocks."""
    from source_fast import _extension

    gen = torch.Generator().manual_seed(2)
    q, o, i = 40, 48, 37
    v = _extension._sparse_layout(torch.randn(q, o, i, generator=gen))
    a = torch.randn(n, t, i, generator=gen)
    if strided:
        a = torch.randn(n, t, 2 * i, generator=gen)[..., ::2]
    pattern = torch.rand(n, 1, o, generator=gen) < 0.45
    g = torch.randn(n, t, o, generator=gen) * pattern
    assert _extension._density(g) < _extension.SPARSE_G_MAX_DENSITY  # the union over tokens
    require("cpu", "score_pairwise", {"v": v, "a": a, "g": g})
    with recording_lib_calls() as recorded:
        runs = at_thread_counts(lambda: ops.score_pairwise(v, a, g, backend="cpu"))
    calls = [name for name, _ in recorded]
    if n * o >= _extension.SPARSE_G_MIN_ENTRIES:
        assert "score_pairwise_sparse_g_cpu" in calls and "score_pairwise_materialized_cpu" not in calls, calls
    assert torch.equal(runs[0], runs[1])
    assert_matches_oracle(runs[0], reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="cpu",
                          dtype=torch.float32)


def test_score_pairwise_cpu_sparse_g_only_for_few_tokens():
    """Past SPARSE_G_MAX_TOKENS tokens (a conv layer's positions) the materialised kernel runs even where g has
    many exact zeros: the sparse kernel forms rows of G_n from T token rows far slower than its GEMMs."""
    from source_fast import _extension

    gen = torch.Generator().manual_seed(3)
    q, o, i, n = 40, 48, 37, 200
    v = torch.randn(q, o, i, generator=gen)
    for t, kernel in [(_extension.SPARSE_G_MAX_TOKENS, "score_pairwise_sparse_g_cpu"),
                      (_extension.SPARSE_G_MAX_TOKENS + 1, "score_pairwise_materialized_cpu")]:
        g = torch.randn(n, t, o, generator=gen) * (torch.rand(n, 1, o, generator=gen) < 0.45)
        a = torch.randn(n, t, i, generator=gen)
        assert _extension.cpu_pairwise_kernel(v, a, g) == kernel, t
        require("cpu", "score_pairwise", {"v": v, "a": a, "g": g})
        assert_matches_oracle(ops.score_pairwise(v, a, g, backend="cpu"), reference.score_pairwise_ref(v, a, g),
                              op="score_pairwise", backend="cpu", dtype=torch.float32)


def _relu_rows(n, t, i, o, a_density, g_density, gen, strided=False):
    """ReLU-like rows: a's zero columns and g's zero outputs the same on every token (a segment's stacked
    checkpoints barely change a ReLU pattern), a strided in its last dimension when asked."""
    a = torch.randn(n, t, 2 * i if strided else i, generator=gen)
    a = a[..., ::2] if strided else a
    a = a * (torch.rand(n, 1, i, generator=gen) < a_density)
    g = torch.randn(n, t, o, generator=gen) * (torch.rand(n, 1, o, generator=gen) < g_density)
    return a, g


@pytest.mark.parametrize("q,n,t,o,i,a_density,layout", [
    (40, 300, 1, 48, 37, 0.4, "queries-innermost"),  # V read in place (the pipeline's layout)
    (33, 257, 1, 29, 65, 0.3, "contiguous"),         # V packed per call; Q = 33: a last one-query vector
    (45, 300, 2, 48, 37, 0.4, "strided"),             # stacked checkpoints: compressed rows of G_n formed
    (40, 1100, 3, 16, 130, 0.2, "queries-innermost"),  # several example blocks, I past 128
    (40, 300, 1, 48, 37, 0.0, "queries-innermost"),   # every a zero (an empty row per example)
], ids=["t1-in-place", "t1-packed", "t2-strided", "t3-blocks", "a-all-zero"])
def test_score_pairwise_cpu_sparse_ag(q, n, t, o, i, a_density, layout):
    """With exact zeros in both a and g (a ReLU layer's unrotated inputs and its ReLU-gated output gradients)
    the CPU backend compresses each example's a to its nonzero columns and contracts only those with the
    nonzero g: equal to the float64 oracle, bitwise the same for 1 and 2 threads."""
    from source_fast import _extension

    gen = torch.Generator().manual_seed(4)
    v = torch.randn(q, o, i, generator=gen)
    if layout == "queries-innermost":
        v = _extension._sparse_layout(v)
    a, g = _relu_rows(n, t, i, o, a_density, 0.45, gen, strided=layout == "strided")
    require("cpu", "score_pairwise", {"v": v, "a": a, "g": g})
    assert _extension.cpu_pairwise_kernel(v, a, g) == "score_pairwise_sparse_ag_cpu"
    with recording_lib_calls() as recorded:
        runs = at_thread_counts(lambda: ops.score_pairwise(v, a, g, backend="cpu"))
    calls = [name for name, _ in recorded]
    assert calls.count("score_pairwise_sparse_ag_cpu") == 2, calls
    assert torch.equal(runs[0], runs[1])
    assert_matches_oracle(runs[0], reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="cpu",
                          dtype=torch.float32)


@pytest.mark.parametrize("q,n,t,o,i", [(1, 1, 1, 1, 1), (5, 37, 1, 23, 19), (17, 40, 2, 9, 3), (70, 33, 3, 7, 41),
                                       (5, 37, 2, 23, 300), (5, 37, 1, 23, 700)],
                         ids=["all-ones", "q5", "q17-t2", "q70-t3", "i300-two-blocks", "i700-five-blocks"])
def test_score_pairwise_sparse_ag_kernel_small_shapes(q, n, t, o, i):
    """The kernel itself below the dispatcher's sizes: one query, query counts around its 16-lane vectors and
    4-vector panels (70: a partial last panel), I = 1 and odd, T = 1..3, with and without zeros; I = 300: two
    blocks of 150 columns, I = 700: five of 140 (about AG_COLUMN_BLOCK = 128 each)."""
    from source_fast import _extension

    gen = torch.Generator().manual_seed(5)
    v = torch.randn(q, o, i, generator=gen)
    for a_density in (1.0, 0.5):
        a, g = _relu_rows(n, t, i, o, a_density, 0.5, gen)
        require("cpu", "score_pairwise", {"v": v, "a": a, "g": g})
        out = torch.full((q, n), float("nan"))
        _extension._lib().score_pairwise_sparse_ag_cpu(
            v.data_ptr(), *v.stride(), a.data_ptr(), *a.stride(), g.data_ptr(), *g.stride(), 0, q, n, t, o, i,
            out.data_ptr(), *out.stride(), 0, 2)
        assert_matches_oracle(out, reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="cpu",
                              dtype=torch.float32)


def test_sparse_ag_choice_follows_the_density_of_a():
    """The sparse-a-and-g kernel runs only where its measured cost model predicts a gain: where the sparse-g
    kernel applies and few enough (example, column) entries of a are nonzero; the limit falls as I grows."""
    from source_fast import _extension

    gen = torch.Generator().manual_seed(6)
    q, n, o, i = 40, 300, 48, 37
    v = torch.randn(q, o, i, generator=gen)
    for a_density, kernel in [(0.3, "score_pairwise_sparse_ag_cpu"), (1.0, "score_pairwise_sparse_g_cpu")]:
        a, g = _relu_rows(n, 1, i, o, a_density, 0.45, gen)
        assert _extension.cpu_pairwise_kernel(v, a, g) == kernel, a_density
    a, _ = _relu_rows(n, 1, i, o, 0.3, 1.0, gen)  # g without zeros: neither sparse kernel
    assert _extension.cpu_pairwise_kernel(v, a, torch.randn(n, 1, o, generator=gen)) == "score_pairwise_cpu"
    assert _extension.sparse_ag_applies(129, 0.5) and not _extension.sparse_ag_applies(129, 0.6)
    assert _extension.sparse_ag_applies(513, 0.3) and not _extension.sparse_ag_applies(513, 0.4)
    assert not _extension.sparse_ag_applies(8, 1.0)


@pytest.mark.parametrize("q,o,t,layout", [(7, 1, 1, "contiguous"), (5, 3, 1, "contiguous"), (13, 5, 2, "contiguous"),
                                          (9, 6, 1, "strided"), (1, 2, 1, "contiguous")],
                         ids=["o1", "o3-two-groups", "o5-t2", "o6-strided", "q1-o2"])
def test_score_pairwise_cpu_tokenwise_few_outputs(q, o, t, layout):
    """The token-wise kernel with fewer outputs than tile rows puts the rows of several whole queries in one
    tile (a regression head: O = 1): equal to the float64 oracle, bitwise the same for 1 and 2 threads."""
    from source_fast import _extension

    v, a, g = _inputs(q, 70, t, 37, o, torch.float32)
    if layout == "strided":
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    require("cpu", "score_pairwise", {"v": v, "a": a, "g": g})
    lib = _extension._lib()

    def run():
        out = torch.empty(q, 70)
        lib.score_pairwise_cpu(v.data_ptr(), *v.stride(), a.data_ptr(), *a.stride(), g.data_ptr(), *g.stride(), 0,
                               q, 70, t, o, 37, out.data_ptr(), *out.stride(), 0, torch.get_num_threads())
        return out

    runs = at_thread_counts(run)
    assert torch.equal(runs[0], runs[1])
    assert_matches_oracle(runs[0], reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="cpu",
                          dtype=torch.float32)


@pytest.mark.parametrize("q,n,t", [(3, 1, 2), (13, 129, 2), (25, 300, 3)], ids=["q3-n1", "q13-n129", "q25-n300"])
def test_score_pairwise_cpu_materialized_strategy(q, n, t):
    """T > 1 picks the materialised C++ kernel (rows of G_n formed in cache): correct across query
    blocks and column blocks, and bitwise the same for 1 and 2 threads."""
    from source_fast import _torch_ops

    v, a, g = _inputs(q, n, t, 23, 17, torch.float32)
    require("cpu", "score_pairwise", {"v": v, "a": a, "g": g})
    assert _torch_ops.pairwise_strategy(q, n, t, 17, 23) == "materialize"
    runs = at_thread_counts(lambda: ops.score_pairwise(v, a, g, backend="cpu"))
    assert torch.equal(runs[0], runs[1])
    assert_matches_oracle(runs[0], reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="cpu",
                          dtype=torch.float32)


@pytest.mark.interpreter
def test_score_pairwise_triton_many_blocks_and_grid_chunks(monkeypatch):
    """Several example and query blocks with ragged edges, 5 tokens in an 8-token step (masked), and the
    launcher's split of the query axis into grid-sized chunks (forced down to 2 blocks per launch), in the
    interpreter."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks, _common

    monkeypatch.setattr(_blocks, "pairwise_blocks", lambda q, n, t, i, dot: _blocks.PairwiseConfig(16, 16, 16, 8, 4, 1))
    monkeypatch.setattr(_common, "MAX_GRID_YZ", 2)
    v, a, g = _inputs(71, 37, 5, 23, 5, torch.float32)  # 5 query blocks (3 launches), 3 example blocks
    _check("triton", v, a, g, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("q,n,t,i,o", [pytest.param(*p.values, id=p.id) for p in SHAPES if p.values[2] <= 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokenwise", [pytest.param(0, id="formed"), pytest.param(5, id="tokenwise")])
def test_score_pairwise_triton_both_forms(tokenwise, dtype, q, n, t, i, o):
    """Both forms for one and several tokens, whichever the tables pick by default: forming G on chip (the
    16-bit GPU default for one token, which the interpreter's default would never run) and the token-wise GEMM
    summed over tokens."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks

    _blocks.override_blocks({"PAIRWISE_TOKENWISE_GPU": {"0": [tokenwise], "1": [tokenwise]}})
    try:
        _check("triton", *_inputs(q, n, t, i, o, dtype), dtype)
    finally:
        _blocks.override_blocks(None)


@pytest.mark.interpreter
@pytest.mark.parametrize("slots", [2, 3, 64])
def test_score_pairwise_triton_split_contraction(monkeypatch, slots):
    """The GPU path's split of the contraction over programs (partials over input ranges and output-row ranges,
    summed in a fixed order), forced in the interpreter for a GPU of `slots` SMs: ragged last splits, several
    query and example blocks; with 64 slots both the inputs and the output rows are split."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks, _common, score_pairwise as kernel

    monkeypatch.setattr(_common, "splits_allowed", lambda device: True)
    monkeypatch.setattr(_common, "num_sms", lambda device: slots)
    # 8 tokens formed at once: every T the formed kernel takes (≤ the table's max_t, 8), the self-test's too
    monkeypatch.setattr(_blocks, "pairwise_blocks", lambda q, n, t, i, dot: _blocks.PairwiseConfig(16, 16, 16, 8, 4, 1))
    monkeypatch.setattr(kernel, "MIN_O_STEPS", 8)  # 70 output rows: up to 8 splits of the o loop too
    chosen = []
    real = kernel.split_contraction
    monkeypatch.setattr(kernel, "split_contraction", lambda *args: chosen.append(real(*args)) or chosen[-1])
    _blocks.override_blocks({"PAIRWISE_TOKENWISE_GPU": {"0": [0]}})  # the formed kernel for one token too
    try:
        for t in (1, 2):
            _check("triton", *_inputs(19, 21, t, 75, 5, torch.float32), torch.float32)
            _check("triton", *_inputs(19, 21, t, 17, 70, torch.float32), torch.float32)
    finally:
        _blocks.override_blocks(None)
    if slots == 64:
        assert any(c[1] > 1 for c in chosen) and any(c[3] > 1 for c in chosen), chosen


def test_split_contraction_fills_one_wave_of_programs(monkeypatch):
    """On a 132-SM GPU the contraction's split minimises waves × per-program work: a one-token wide tile grid of
    128 programs is not split (one wave already); a materialised chunk of 2 tiles (Q = 64) is split over inputs
    and output rows into one full wave; a 32-tile chunk (Q = 512) into 4 output-row ranges (128 programs, not
    17 input splits in 5 waves); no split off CUDA or in the interpreter."""
    from source_fast.kernels import _common, score_pairwise as kernel

    cpu = torch.device("cpu")
    assert kernel.split_contraction(2, 1040, 1024, 64, 64 * 256, cpu) == (1088, 1, 1024, 1)
    monkeypatch.setattr(_common, "splits_allowed", lambda device: True)
    monkeypatch.setattr(_common, "num_sms", lambda device: 132)
    assert kernel.split_contraction(128, 1040, 1024, 64, 512 * 8192, cpu) == (1088, 1, 1024, 1)
    assert kernel.split_contraction(32, 1040, 1024, 64, 512 * 1024, cpu) == (1088, 1, 256, 4)
    i_per, i_splits, o_per, o_splits = kernel.split_contraction(2, 1040, 1024, 64, 64 * 256, cpu)
    assert i_splits > 1 and o_splits > 1 and o_per >= kernel.MIN_O_STEPS
    assert 2 * i_splits * o_splits <= 132 and i_per * i_splits >= 1040 and o_per * o_splits >= 1024
    # the workspace bound: at most WORKSPACE_BYTES of fp32 partials
    _, i_splits, _, o_splits = kernel.split_contraction(1, 1040, 1024, 64, 2**22, cpu)
    assert i_splits * o_splits * 4 * 2**22 <= _common.WORKSPACE_BYTES


@contextlib.contextmanager
def _materializing(tables: dict | None = None):
    """The materialised form under the interpreter: at most 2 tokens formed on chip (plus `tables`' overrides), and
    torch.empty NaN-filled (deterministic mode), so that a column the forming leaves unwritten shows."""
    from source_fast.kernels import _blocks

    _blocks.override_blocks({"PAIRWISE_GPU_BLOCKS": {k: [[64, 32, 16, 1, 4, 2], [64, 32, 16, 2, 4, 2]]
                                                     for k in ("0", "1")}, **(tables or {})})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        _blocks.override_blocks(None)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q,n,t,i,o,chunk,slots", [
    pytest.param(5, 7, 3, 37, 11, 3, 1, id="chunks-3+3+1"),
    pytest.param(19, 40, 9, 75, 5, 40, 24, id="one-chunk-split"),
    pytest.param(1, 1, 70, 17, 9, 1, 1, id="q1-n1-t70"),
])
def test_score_pairwise_triton_materialized(monkeypatch, dtype, q, n, t, i, o, chunk, slots):
    """More tokens than the several-token config forms at once: G_n formed in memory (chunks of examples, ragged
    last chunk, padding columns zero) and contracted by the kernel reading G (GIVEN), split over programs for a
    GPU of `slots` SMs; against the oracle, and checked to take that form."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks, _common, score_pairwise as kernel

    monkeypatch.setattr(kernel, "materialized_examples", lambda q_, n_, b, block_n, free=None: chunk)
    monkeypatch.setattr(_common, "splits_allowed", lambda device: slots > 1)
    monkeypatch.setattr(_common, "num_sms", lambda device: slots)
    calls = []
    real = kernel._contract
    monkeypatch.setattr(kernel, "_contract",
                        lambda *args, **kw: calls.append((kw["given"], args[3].shape[1])) or real(*args, **kw))
    with _materializing():
        assert _blocks.pairwise_materializes(t, _common.dot_code(dtype))
        _check("triton", *_inputs(q, n, t, i, o, dtype), dtype)
    sizes = [min(chunk, n - start) for start in range(0, n, chunk)]
    # one GIVEN contraction per chunk (the last ones: a first use of the backend runs its self-test before)
    assert calls[-len(sizes):] == [(True, size) for size in sizes]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form,contract", [(1, 0), (0, 1), (1, 1)], ids=["torch-form", "torch-contract", "torch-both"])
def test_score_pairwise_triton_materialized_by_torch(monkeypatch, dtype, form, contract):
    """PAIRWISE_MATERIALIZED_TORCH: either stage of the materialised form by torch's GEMM on the same chunks (ragged
    last chunk, padded rows), against the oracle; 16-bit G only (fp32 stays with the kernels, whose products ignore
    the process's TF32 setting)."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common, score_pairwise as kernel

    monkeypatch.setattr(kernel, "materialized_examples", lambda q_, n_, b, block_n, free=None: 3)
    stages, kernels = [], []
    real_plan, real_bmm, real_contract = kernel.materialized_plan, _common.bmm, kernel._contract
    monkeypatch.setattr(kernel, "materialized_plan",
                        lambda *args: stages.append(real_plan(*args)) or stages[-1])
    monkeypatch.setattr(_common, "bmm", lambda *args, **kw: kernels.append("form") or real_bmm(*args, **kw))
    monkeypatch.setattr(kernel, "_contract", lambda *args, **kw: kernels.append("contract") or real_contract(*args, **kw))
    with _materializing({"PAIRWISE_MATERIALIZED_TORCH": {"form": [form], "contract": [contract]}}):
        _check("triton", *_inputs(5, 7, 3, 37, 11, dtype), dtype)
    plan = stages[-1]
    sixteen = dtype != torch.float32
    assert (plan.torch_form, plan.torch_contract) == (sixteen and form == 1, sixteen and contract == 1)
    assert plan.i_pad == _common.round_up(37, _common.ALIGN) and plan.grads.shape[2] == plan.i_pad
    kernels = kernels[-6:]  # the last call's three chunks (a first use of the backend runs its self-test before)
    assert kernels.count("form") == (0 if plan.torch_form else 3)
    assert kernels.count("contract") == (0 if plan.torch_contract else 3)


MMA_DEFAULT = [128, 64, 16, 16, 128, 1, 1, 8, 2]  # the sm_90 default tile of PAIRWISE_MMA_FORMED_GPU_BLOCKS


@pytest.mark.interpreter
@pytest.mark.parametrize("q,n,t,i,o,tile,slots", [
    pytest.param(5, 7, 3, 37, 11, None, 1, id="t3-fitted"),
    pytest.param(19, 40, 16, 75, 33, [16, 16, 16, 16, 0, 0, 0, 4, 1], 24, id="t16-split-plain-g-nested"),
    pytest.param(4, 20, 7, 24, 70, [16, 16, 16, 8, 32, 1, 0, 4, 1], 2, id="o-chunks-split-nested"),
    pytest.param(4, 20, 7, 40, 70, [16, 16, 16, 8, 32, 1, 1, 4, 1], 3, id="o-chunks-split-flat"),
    pytest.param(6, 9, 16, 33, 17, [16, 16, 16, 16, 0, 0, 1, 4, 1], 1, id="t16-plain-g-flat"),
    pytest.param(1, 1, 9, 17, 9, MMA_DEFAULT, 1, id="q1-n1-t9-gpu-tile"),
    pytest.param(70, 3, 5, 16, 40, MMA_DEFAULT, 3, id="q70-gpu-tile-split"),
])
def test_score_pairwise_triton_mma_formed(monkeypatch, q, n, t, i, o, tile, slots):
    """PAIRWISE_MMA_FORMED_GPU_BLOCKS on: 16-bit examples of more tokens than the several-token formed config take
    the fused materialised form (G tiles formed by a batched dot over the tokens and contracted at once), at tiles
    fitted to the problem or forced (the GPU's default included), split over programs for a GPU of `slots` SMs;
    odd sizes pad the inputs, the output rows and the tokens; against the oracle, and checked to take that form."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks, _common, score_pairwise as kernel

    monkeypatch.setattr(_common, "splits_allowed", lambda device: slots > 1)
    monkeypatch.setattr(_common, "num_sms", lambda device: slots)
    calls = []
    real = kernel.mma_formed_scores
    monkeypatch.setattr(kernel, "mma_formed_scores", lambda *args: calls.append(args[-1]) or real(*args))
    entry = [16, *(tile or MMA_DEFAULT)]
    if tile is None:  # the table's switch without forcing its tile: tiles fitted to the problem
        monkeypatch.setitem(_blocks.PAIRWISE_MMA_FORMED_GPU_BLOCKS, 1, tuple(entry))
        tables = {}
    else:
        tables = {"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"1": entry}}
    with _materializing(tables):
        _check("triton", *_inputs(q, n, t, i, o, torch.float16), torch.float16)
    assert calls, "the fused materialised form did not run"
    if tile is not None:
        assert tuple(calls[-1])[:4] == tuple(tile[:4]) and calls[-1].o_chunk == tile[4]
        assert (calls[-1].async_g, calls[-1].flat) == (bool(tile[5]), bool(tile[6]))
        assert calls[-1].block_t == 16


@pytest.mark.interpreter
def test_score_pairwise_triton_mma_formed_strided_inputs():
    """The fused form on non-contiguous views (a permuted query batch, token- and output-strided slices)."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    v = torch.randn(13, 41, 3).half().permute(2, 0, 1)  # [3, 13, 41]
    a = torch.randn(5, 12, 41).half()[:, ::2]            # [5, 6, 41], token stride 2
    g = torch.randn(5, 6, 26).half()[:, :, ::2]          # [5, 6, 13], output stride 2
    from source_fast.kernels import score_pairwise as kernel

    assert not (v.is_contiguous() or a.is_contiguous() or g.is_contiguous())
    with _materializing({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"1": [16, 16, 16, 16, 16, 0, 1, 1, 4, 1]}}):
        assert kernel.pairwise_form(3, 5, 6, (torch.float16,) * 3)[0] == "fused"
        _check("triton", v, a, g, torch.float16)


@pytest.mark.interpreter
def test_score_pairwise_triton_mma_formed_grid_chunks(monkeypatch):
    """The fused form's launches over query ranges that the grid's axis 1 can hold (forced down to 2 blocks per
    launch), with ragged example and query blocks."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common, score_pairwise as kernel

    launches = []
    real = kernel._score_pairwise_mma_kernel
    monkeypatch.setattr(kernel, "_score_pairwise_mma_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: launches.append(grid) or real[grid]})())
    monkeypatch.setattr(_common, "MAX_GRID_YZ", 2)
    with _materializing({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"1": [16, 16, 16, 16, 16, 0, 1, 1, 4, 1]}}):
        _check("triton", *_inputs(71, 37, 9, 23, 5, torch.float16), torch.float16)  # 5 query blocks: 3 launches
    assert [grid[:2] for grid in launches[-3:]] == [(3, 2), (3, 2), (3, 1)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,t", [(torch.float16, 17), (torch.float32, 6)], ids=["fp16-t17", "fp32-t6"])
def test_score_pairwise_triton_mma_formed_bounds(monkeypatch, dtype, t):
    """With the fused form on, examples of more tokens than its first element, and fp32 inputs, keep the
    materialised form (GIVEN contractions), still matching the oracle."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import score_pairwise as kernel

    calls, given = [], []
    real, real_contract = kernel.mma_formed_scores, kernel._contract
    monkeypatch.setattr(kernel, "mma_formed_scores", lambda *args: calls.append(t) or real(*args))
    monkeypatch.setattr(kernel, "_contract",
                        lambda *args, **kw: given.append(kw["given"]) or real_contract(*args, **kw))
    with _materializing({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"1": [16, *MMA_DEFAULT]}}):
        _check("triton", *_inputs(3, 5, t, 37, 11, dtype), dtype)
    assert not calls and given and given[-1] is True


def test_mma_formed_table_validation():
    """The fused form's switch takes 0 (off) up to the one K step it forms, 16 tokens."""
    from source_fast.kernels import _blocks

    assert _blocks.validate({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"2": [0, *MMA_DEFAULT]}}, "t")
    assert _blocks.validate({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"2": [16, *MMA_DEFAULT]}}, "t")
    with pytest.raises(ValueError, match=r"PAIRWISE_MMA_FORMED_GPU_BLOCKS\[2\]: expected at most 16 at position 0"):
        _blocks.validate({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"2": [17, *MMA_DEFAULT]}}, "t")
    with pytest.raises(ValueError, match="expected ints >= 1"):
        _blocks.validate({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"2": [16, 0, 64, 16, 16, 128, 1, 1, 8, 2]}}, "t")
    for position in (6, 7):
        entry = [16, 128, 64, 16, 16, 128, 1, 1, 8, 2]
        entry[position] = 2
        with pytest.raises(ValueError, match=f"expected at most 1 at position {position}"):
            _blocks.validate({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"2": entry}}, "t")
    assert _blocks.pairwise_mma_formed_blocks(8, 8, 16, 0) is None  # fp32: never


def test_materialized_chunks_hold_twice_the_queries():
    """A chunk of materialised G_n: the memory budget's examples, but at least 2·Q (the queries then stream at most
    half the bytes G does) and one example block, within a quarter of the free device memory, and never more
    than N."""
    from source_fast import _config
    from source_fast.kernels import score_pairwise as kernel

    budget = _config.chunk_bytes()
    per_example = budget // 100
    assert kernel.materialized_examples(8, 10_000, per_example, 64) == 100
    assert kernel.materialized_examples(512, 10_000, per_example, 64) == 1024
    assert kernel.materialized_examples(1, 10_000, budget * 4, 128) == 128
    assert kernel.materialized_examples(512, 300, per_example, 64) == 300
    # a quarter of the free device memory caps what the budget does not ask for
    assert kernel.materialized_examples(512, 10_000, per_example, 64, free_bytes=per_example * 2000) == 500
    assert kernel.materialized_examples(512, 10_000, per_example, 64, free_bytes=per_example * 40) == 100


def test_torch_backend_widens_materialized_chunks_on_a_gpu_only(monkeypatch):
    """The torch backend's materialised score_pairwise chunks by the memory budget on CPU, and on a GPU by the
    Triton form's rule (at least 2·Q examples within a quarter of free memory): a 128-example chunk made each cuBLAS
    product a Q × 128 output on the H100."""
    from source_fast import _config, _torch_ops

    per_example = _config.chunk_bytes() // 128 // 2  # bf16 elements: the budget holds 128 examples
    assert _torch_ops._pairwise_chunk(512, 8192, per_example, torch.bfloat16, torch.device("cpu")) == 128
    free = {"bytes": 10**12}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], free["bytes"]))
    cuda = torch.device("cuda")
    assert _torch_ops._pairwise_chunk(512, 8192, per_example, torch.bfloat16, cuda) == 1024
    assert _torch_ops._pairwise_chunk(16, 8192, per_example, torch.bfloat16, cuda) == 128  # the budget is more
    free["bytes"] = 4 * 300 * per_example * 2  # a quarter of free memory holds 300 examples
    assert _torch_ops._pairwise_chunk(512, 8192, per_example, torch.bfloat16, cuda) == 300


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_pairwise_triton_aligned_layout(dtype):
    """The launcher pads the i axis to a multiple of 16 and stores g as [O, T, N_pad]: strided and offset inputs
    (views whose rows start off a 16-element boundary) give the same scores as contiguous copies, bit for bit,
    and aligned contiguous inputs are passed through without a copy."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common, score_pairwise as kernel

    v, a, g = _inputs(5, 9, 2, 37, 11, dtype)
    base = torch.randn(9, 2, 40).to(dtype)
    base[..., 1:38] = a
    a_view = base[..., 1:38]  # offset start, row stride 40
    v_t = v.transpose(1, 2).contiguous().transpose(1, 2)  # i not unit-stride
    got = ops.score_pairwise(v_t, a_view, g, backend="triton")
    assert torch.equal(got, ops.score_pairwise(v, a, g, backend="triton"))
    assert_matches_oracle(got, reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="triton",
                          dtype=dtype, baseline=reference.score_pairwise_ref(v, a, g, upcast=False)
                          if dtype != torch.float32 else None)

    vk, ak, gt, i_pad = kernel._kernel_layout(v, a, g)
    assert i_pad == 48 and vk.shape == (5, 11, 48) and ak.shape == (9, 2, 48) and gt.shape == (11, 2, 16)
    assert torch.equal(ak[..., :37], a) and not ak[..., 37:].any()
    assert torch.equal(gt[..., :9], g.permute(2, 1, 0)) and not gt[..., 9:].any()
    aligned = torch.randn(3, 4, 32).to(dtype)
    assert _common.aligned_rows(aligned, 32) is aligned
    view = aligned[..., :16]  # strides (128, 32, 1): still aligned, passed through
    assert _common.aligned_rows(view, 16) is view
    shifted = aligned[..., 1:17]  # starts one element into a row: copied
    assert _common.aligned_rows(shifted, 16) is not shifted and torch.equal(_common.aligned_rows(shifted, 16), shifted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_pairwise_fills_uninitialized_output(backend):
    v, a, g = _inputs(17, 3, 5, 80, 20, torch.float32)
    require(backend, "score_pairwise", {"v": v, "a": a, "g": g})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty → NaN-filled
    try:
        got = ops.score_pairwise(v, a, g, backend=backend)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.isfinite(got).all()
    assert_matches_oracle(got, reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend=backend,
                          dtype=torch.float32)


@pytest.mark.slow
def test_score_pairwise_kernel_compiles_for_gpu_without_spills():
    """Every GPU configuration builds for sm_90, given the alignment the launcher guarantees, with no register
    spills, pipelined loads (asynchronous copies) and, for fp16/bf16, wgmma tensor-core dots: the formed kernel
    (kernels/_blocks.PAIRWISE_GPU_BLOCKS: one token, and several: 2 and the most tokens formed at once) reading
    the formed tile from registers, and the contraction of materialised G (PAIRWISE_MATERIALIZED_GPU_BLOCKS).
    The wheel's cuobjdump reports the stack frame and the instructions. The 16-bit configurations also build for
    sm_80."""
    from source_fast.kernels import _blocks

    formed, given = [], []
    for dot, ptr in ((0, "*fp32"), (1, "*fp16"), (2, "*bf16"), (4, "*fp32")):  # 4: 3xTF32 (FP32_TENSOR_CORES)
        strides = {f"s_{k}": "i64" for k in ("vq", "vo", "an", "at", "go", "gt", "os", "oq")}
        sig = dict(v_ptr=ptr, a_ptr=ptr, gt_ptr=ptr, out_ptr="*fp32", Q="i32", N="i32", T="i32", O="i32",
                   I="i32", i_per_split="i32", o_per_split="i32", i_splits="i32", **strides)
        div16 = ["v_ptr", "a_ptr", "gt_ptr", "out_ptr", "s_vq", "s_vo", "s_an", "s_at", "s_go", "s_gt", "I",
                 "i_per_split"]
        for block_q, block_n, block_i, max_t, warps, stages in _blocks.PAIRWISE_GPU_BLOCKS[dot]:
            for block_t in sorted({min(2, max_t), max_t}):
                const = dict(BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_T=block_t, GIVEN=False,
                             DOT=dot)
                formed.append(("source_fast.kernels.score_pairwise", "_score_pairwise_kernel", sig, const, 90,
                               {"num_warps": warps, "num_stages": stages, "div16": div16}))
        block_q, block_n, block_i, warps, stages = _blocks.PAIRWISE_MATERIALIZED_GPU_BLOCKS[dot]
        const = dict(BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_T=1, GIVEN=True, DOT=dot)
        given.append(("source_fast.kernels.score_pairwise", "_score_pairwise_kernel", sig, const, 90,
                      {"num_warps": warps, "num_stages": stages, "div16": div16}))
    for case, usage in zip(formed + given, assert_fast_sm90_builds(formed + given)):
        # The formed G tile is wgmma's left operand, read from registers: storing it to shared memory every step
        # (as a right operand) cost a round trip and a wait per step in the previous kernel.
        assert (usage is None or case[3]["DOT"] == 0 or case[3]["GIVEN"]
                or usage["HGMMA_REG_A"] == usage["HGMMA"]), (case[3], usage)
    # Ampere (sm_80: mma.sync instead of wgmma) builds too, for the 16-bit and 3xTF32 configurations.
    compile_for_gpu([case[:4] + (80,) + case[5:] for case in formed + given if case[3]["DOT"] != 0])


@pytest.mark.slow
def test_score_pairwise_mma_kernel_compiles_for_gpu_without_spills():
    """The fused materialised form (PAIRWISE_MMA_FORMED_GPU_BLOCKS) builds for sm_90 at its default tiles without
    spills, within an H100's shared memory, with pipelined loads, the forming on mma.sync (HMMA) and the contraction
    on wgmma reading the formed tile from registers; and for sm_80 (ARCH_BLOCKS) without spills in its loops.
    Strides as 64-bit integers, the JIT's type for any above 2^31 (with 32-bit ones the builds take fewer
    registers)."""
    from source_fast.kernels import _blocks

    strides = {f"s_{k}": "i64" for k in ("vq", "vo", "an", "at", "gn", "go", "os", "oq")}
    div16 = ["v_ptr", "a_ptr", "g_ptr", "out_ptr", "s_vq", "s_vo", "s_an", "s_at", "s_gn", "s_go", "s_os", "I",
             "i_per_split"]
    cases = []
    for arch, table in ((90, _blocks.PAIRWISE_MMA_FORMED_GPU_BLOCKS),
                        (80, _blocks.ARCH_BLOCKS["sm_80"]["PAIRWISE_MMA_FORMED_GPU_BLOCKS"])):
        for dot, ptr in ((1, "*fp16"), (2, "*bf16")):
            _, block_q, block_n, block_o, block_i, _, async_g, flat, warps, stages = table[dot]
            sig = dict(v_ptr=ptr, a_ptr=ptr, g_ptr=ptr, out_ptr="*fp32", Q="i32", N="i32", T="i32", O="i32", I="i32",
                       i_per_split="i32", o_per_split="i32", i_splits="i32", o_chunk="i32", **strides)
            const = dict(BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_I=block_i,
                         BLOCK_T=_blocks.MMA_FORMED_MAX_T, ASYNC_G=bool(async_g), FLAT=bool(flat))
            cases.append(("source_fast.kernels.score_pairwise", "_score_pairwise_mma_kernel", sig, const, arch,
                          {"num_warps": warps, "num_stages": stages, "div16": div16}))
    for case, usage in zip(cases, assert_fast_sm90_builds(cases)):
        if usage is None:
            continue
        # sm_80: a few bytes spilled after the loops are paid once per program, not per step
        assert usage["SPILL_IN_LOOP"] == 0 and usage["HMMA"] > 0 and usage["LDGSTS"] > 0, (case[4], case[3], usage)
        if case[4] == 90:
            assert usage["HGMMA"] > 0 and usage["HGMMA_REG_A"] == usage["HGMMA"], (case[3], usage)


@pytest.mark.interpreter
@pytest.mark.parametrize("t", [2, 6], ids=["formed", "materialized"])
def test_score_pairwise_triton_fp32_as_3xtf32(monkeypatch, blocks_override, t):
    """With FP32_TENSOR_CORES on for "pairwise", fp32 several-token scoring takes the 3xTF32 dot, formed on chip
    (T ≤ its tile's 4 tokens) or materialised (above), and matches the oracle at fp32's tolerance (fp32
    arithmetic in the interpreter; the gpu test below holds the tensor cores to it)."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common, score_pairwise as kernel

    dots = []
    real = kernel._contract
    monkeypatch.setattr(kernel, "_contract", lambda *args, **kw: dots.append((args[8], kw["given"])) or real(*args, **kw))
    blocks_override({"FP32_TENSOR_CORES": {"pairwise": [1]}})
    _check("triton", *_inputs(5, 9, t, 37, 11, torch.float32), torch.float32)
    assert dots[-1] == (_common.DOT_F32X3, t > 4)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [2, 9])
def test_score_pairwise_fp32_as_3xtf32_gpu(blocks_override, t):
    """3xTF32 on the tensor cores keeps fp32's tolerance against the float64 oracle."""
    blocks_override({"FP32_TENSOR_CORES": {"pairwise": [1]}})
    _check("triton", *_inputs(7, 45, t, 131, 67, torch.float32, device="cuda"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("form,contract", [(1, 0), (0, 1), (1, 1)], ids=["torch-form", "torch-contract", "torch-both"])
def test_score_pairwise_bf16_materialized_by_torch_gpu(blocks_override, form, contract):
    """The materialised form's stages by cuBLAS (PAIRWISE_MATERIALIZED_TORCH) keep bf16's rule against the oracle."""
    blocks_override({"PAIRWISE_MATERIALIZED_TORCH": {"form": [form], "contract": [contract]}})
    _check("triton", *_inputs(7, 45, 40, 131, 67, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [2, 16])
def test_score_pairwise_bf16_mma_formed_gpu(blocks_override, t):
    """The fused materialised form (forced on, at the device's tile) keeps bf16's rule against the oracle and is
    bitwise deterministic over 50 runs (no atomics; splits summed in a fixed order)."""
    from source_fast.kernels import _blocks

    entry = list(_blocks.gpu_blocks("PAIRWISE_MMA_FORMED_GPU_BLOCKS", 2))
    blocks_override({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"2": [16, *entry[1:]]}})
    inputs = _inputs(7, 300, t, 131, 67, torch.bfloat16, device="cuda")
    first, _ = _check("triton", *inputs, torch.bfloat16)
    for _ in range(50):
        assert torch.equal(ops.score_pairwise(*inputs, backend="triton"), first)


@pytest.mark.gpu
@pytest.mark.slow
def test_score_pairwise_mma_formed_index_space_above_2_31_gpu(blocks_override):
    """The fused form (forced on) with N·T·I > 2^31 input elements (int64 example offsets); checked on a sample."""
    from source_fast.kernels import _blocks

    entry = list(_blocks.gpu_blocks("PAIRWISE_MMA_FORMED_GPU_BLOCKS", 1))
    blocks_override({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"1": [16, *entry[1:]]}})
    n, t, i, o, q = 262200, 16, 520, 8, 3
    a = torch.empty(n, t, i, dtype=torch.float16, device="cuda").uniform_(-1, 1)
    g = torch.empty(n, t, o, dtype=torch.float16, device="cuda").uniform_(-1, 1)
    v = torch.randn(q, o, i, device="cuda").half()
    assert n * t * i > 2**31
    got = ops.score_pairwise(v, a, g, backend="triton")
    sample = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    assert_matches_oracle(got[:, sample], reference.score_pairwise_ref(v, a[sample], g[sample]), op="score_pairwise",
                          backend="triton", dtype=torch.float16,
                          baseline=reference.score_pairwise_ref(v, a[sample], g[sample], upcast=False))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 9])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_pairwise_bf16_gpu(backend, t):
    _check(backend, *_inputs(7, 45, t, 131, 67, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_pairwise_index_space_above_2_31_gpu(backend):
    """N·T·I > 2^31 token elements (int64 row offsets); checked on a sample of examples."""
    n, t, i, o, q = 4100, 1024, 520, 8, 3
    a = torch.empty(n, t, i, dtype=torch.float16, device="cuda").uniform_(-1, 1)
    g = torch.empty(n, t, o, dtype=torch.float16, device="cuda").uniform_(-1, 1)
    v = torch.randn(q, o, i, device="cuda")
    require(backend, "score_pairwise", {"v": v, "a": a, "g": g})
    got = ops.score_pairwise(v, a, g, backend=backend)
    sample = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    oracle = reference.score_pairwise_ref(v, a[sample], g[sample])
    baseline = reference.score_pairwise_ref(v, a[sample], g[sample], upcast=False)
    assert_matches_oracle(got[:, sample], oracle, op="score_pairwise", backend=backend, dtype=torch.float16,
                          baseline=baseline)


@pytest.mark.parametrize("shape,strategy", [((6, 40, 2, 23, 9), "materialize"), ((3, 40, 1, 23, 9), "tokenwise"),
                                            ((1, 40, 3, 23, 9), "tokenwise")], ids=["materialize", "tokenwise-t1",
                                                                                   "tokenwise-t3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_backend_sixteen_bit_paths(monkeypatch, dtype, shape, strategy):
    """Where torch has fp32-output 16-bit products (CUDA builds; probed, never on CPU), the torch backend keeps
    16-bit operands in its GEMMs (token-wise VA = V aᵀ, or materialised G_n) with fp32 results. Emulated here
    (the probe forced, the product computed in fp32 from the 16-bit operands): within the rule for 16-bit inputs
    (≤ 2x the same-precision torch error)."""
    from source_fast import _torch_ops

    assert not _torch_ops.has_fp32_out_mm(torch.device("cpu"), dtype)
    q, n, t, i, o = shape
    v, a, g = _inputs(q, n, t, i, o, dtype)
    assert _torch_ops.pairwise_strategy(q, n, t, o, i) == strategy
    calls = []
    monkeypatch.setattr(_torch_ops, "has_fp32_out_mm", lambda device, dt: True)
    monkeypatch.setattr(_torch_ops, "_mm_fp32_out",
                        lambda x, y: calls.append((x.dtype, y.dtype)) or x.float() @ y.float())
    got = ops.score_pairwise(v, a, g, backend="torch")
    assert calls and set(calls) == {(dtype, dtype)} and got.dtype == torch.float32
    assert_matches_oracle(got, reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend="torch",
                          dtype=dtype, baseline=reference.score_pairwise_ref(v, a, g, upcast=False))


@pytest.mark.gpu
def test_torch_backend_sixteen_bit_path_on_gpu():
    """On a CUDA device: the probe of fp32-output 16-bit products, and the torch backend's bf16 paths
    (materialised and token-wise) within the rule for 16-bit inputs."""
    from source_fast import _torch_ops

    probed = _torch_ops.has_fp32_out_mm(torch.device("cuda"), torch.bfloat16)
    print(f"torch {torch.__version__}: fp32-output bf16 products {'available' if probed else 'absent'}")
    for (q, n, t, i, o), strategy in (((16, 45, 4, 131, 67), "materialize"), ((7, 45, 1, 131, 67), "tokenwise")):
        assert _torch_ops.pairwise_strategy(q, n, t, o, i) == strategy
        _check("torch", *_inputs(q, n, t, i, o, torch.bfloat16, device="cuda"), torch.bfloat16)
