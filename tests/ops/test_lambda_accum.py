"""lambda_accum: every available backend against the float64 reference (source_fast/reference/lambda_accum.py)."""
import pytest
import torch

from _backends import (TOKEN_SHAPES, assert_fast_sm90_builds, backend_params, bmm_cases, compile_for_gpu,
                       eigh_basis, require)
from _tolerances import assert_matches_oracle
from source_fast import _torch_ops, ops, reference

BACKENDS = backend_params("cpu")
GPU_BACKENDS = backend_params("cuda")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
SHAPES = TOKEN_SHAPES  # (N, T, I, O), shared with the other per-example ops


def _inputs(n, t, i, o, dtype, device="cpu"):
    a = torch.randn(n, t, i, device=device).to(dtype)
    g = torch.randn(n, t, o, device=device).to(dtype)
    return a, g, eigh_basis(i, device), eigh_basis(o, device)


def _tensors(a, g, q_a, q_s):
    return {"a": a, "g": g, "q_a": q_a, "q_s": q_s}


def _check(backend, a, g, q_a, q_s, dtype):
    require(backend, "lambda_accum", _tensors(a, g, q_a, q_s))
    got = ops.lambda_accum(a, g, q_a, q_s, backend=backend)
    oracle = reference.lambda_accum_ref(a, g, q_a, q_s)
    baseline = None
    if dtype in (torch.float16, torch.bfloat16):
        baseline = reference.lambda_accum_ref(a, g, q_a, q_s, upcast=False)
    assert_matches_oracle(got, oracle, op="lambda_accum", backend=backend, dtype=dtype, baseline=baseline)
    return got


@pytest.mark.parametrize("n,t,i,o", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_accum_matches_oracle(backend, dtype, n, t, i, o):
    got = _check(backend, *_inputs(n, t, i, o, dtype), dtype)
    assert got.dtype == torch.float32 and got.shape == (o, i)


ORDERS = [pytest.param(float("inf"), "rows", id="rows-first"), pytest.param(0.0, "materialize", id="G-first")]


@pytest.mark.parametrize("gain, order", ORDERS)
@pytest.mark.parametrize("n,t,i,o", [(5, 3, 41, 13), (3, 40, 17, 9), (2, 6, 1, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lambda_accum_both_rotation_orders_match_oracle(monkeypatch, backend, dtype, gain, order, n, t, i, o):
    """The torch and cpu backends form Q_Sᵀ G_n Q_A from rotated token rows or from G_n (_torch_ops.rotation_order):
    each order, forced, against the oracle, with non-contiguous eigenvectors and chunks of one example."""
    monkeypatch.setattr(_torch_ops, "MATERIALIZE_FIRST_MIN_GAIN", gain)
    monkeypatch.setattr(_torch_ops, "_chunk_rows", lambda per_row, dtype, total: 1)
    assert _torch_ops.rotation_order(t, o, i) == order
    _check(backend, *_inputs(n, t, i, o, dtype), dtype)


def test_rotation_order_follows_the_multiply_add_counts():
    """G_n first where it needs MATERIALIZE_FIRST_MIN_GAIN times fewer multiply-adds: a small CNN's conv layers
    (many positions, narrow), not a transformer's token rows (T ≈ 35, O·I ≥ 64·65) nor one token."""
    order = _torch_ops.rotation_order
    assert order(256, 32, 145) == "materialize" and order(1024, 16, 28) == "materialize"
    assert order(35, 192, 65) == "rows" and order(35, 64, 257) == "rows" and order(16, 128, 129) == "rows"
    assert order(1, 1, 1) == "rows" and order(1, 16, 28) == "rows"
    # at the margin: T·(O² + I² + O·I) against MATERIALIZE_FIRST_MIN_GAIN·(T·O·I + O·I·(O + I))
    t, o, i = 60, 64, 65
    rows, formed = t * (o * o + i * i + o * i), t * o * i + o * i * (o + i)
    assert order(t, o, i) == ("materialize" if rows > _torch_ops.MATERIALIZE_FIRST_MIN_GAIN * formed else "rows")


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_accum_noncontiguous_eigenvectors(backend, t):
    """Column-major q_a/q_s (as eigh returns them) give the same numbers as their contiguous copies."""
    a, g, q_a, q_s = _inputs(7, t, 41, 13, torch.float32)
    assert not q_a.is_contiguous() and not q_s.is_contiguous()
    got = _check(backend, a, g, q_a, q_s, torch.float32)
    dense = ops.lambda_accum(a, g, q_a.contiguous(), q_s.contiguous(), backend=backend)
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6 * float(dense.abs().max()))
    # the transposed basis (a different matrix) must give a different answer: strides are honoured
    wrong = ops.lambda_accum(a, g, q_a.T, q_s.T, backend=backend)
    assert not torch.allclose(wrong, got, rtol=1e-3, atol=0)


@pytest.mark.parametrize("t", [1, 3, 70])  # 70: torch and cpu form G_n first (rotation_order)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=["out-fp32", "out-fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_accum_out_accumulates(backend, out_dtype, t):
    a, g, q_a, q_s = _inputs(7, t, 41, 13, torch.float32)
    start = torch.rand(13, 41, dtype=out_dtype)
    out = start.clone()
    # A float64 accumulator is part of the dispatch: only backends that accumulate in float64 take it.
    require(backend, "lambda_accum", {**_tensors(a, g, q_a, q_s), "out": out})
    ret = ops.lambda_accum(a, g, q_a, q_s, out=out, backend=backend)
    assert ret.data_ptr() == out.data_ptr() and ret.dtype == out_dtype
    one = reference.lambda_accum_ref(a, g, q_a, q_s)
    assert_matches_oracle(out, start.double() + one, op="lambda_accum", backend=backend, dtype=torch.float32)
    ops.lambda_accum(a, g, q_a, q_s, out=out, backend=backend)
    assert_matches_oracle(out, start.double() + 2 * one, op="lambda_accum", backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("t", [1, 3, 70])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_accum_deterministic(backend, t):
    a, g, q_a, q_s = _inputs(7, t, 80, 20, torch.float32)
    require(backend, "lambda_accum", _tensors(a, g, q_a, q_s))
    runs = [ops.lambda_accum(a, g, q_a, q_s, backend=backend, deterministic=True) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("t", [1, 3, 70])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_accum_fills_uninitialized_output(backend, t):
    a, g, q_a, q_s = _inputs(5, t, 80, 20, torch.float32)
    require(backend, "lambda_accum", _tensors(a, g, q_a, q_s))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty → NaN-filled
    try:
        got = ops.lambda_accum(a, g, q_a, q_s, backend=backend)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.isfinite(got).all()
    assert_matches_oracle(got, reference.lambda_accum_ref(a, g, q_a, q_s), op="lambda_accum", backend=backend,
                          dtype=torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("t", [1, 3])
def test_lambda_accum_triton_chunks_and_splits(monkeypatch, t):
    """Chunking over examples and the GPU's split-over-n partials, forced in the interpreter."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common, lambda_accum

    monkeypatch.setattr(_common, "chunk_examples", lambda n, per_example: 3)
    monkeypatch.setattr(_common, "split_count", lambda *args, **kwargs: 2)
    a, g, q_a, q_s = _inputs(8, t, 41, 13, torch.float32)
    out = torch.ones(13, 41)
    lambda_accum.lambda_accum_triton(a, g, q_a, q_s, out)
    assert_matches_oracle(out, 1.0 + reference.lambda_accum_ref(a, g, q_a, q_s), op="lambda_accum",
                          backend="triton", dtype=torch.float32)


@pytest.mark.slow
def test_lambda_accum_kernels_compile_for_gpu():
    """The fused kernel's GPU blocks build for sm_90, given the launcher's layout (rotated rows padded to a
    multiple of 16), with no spills, pipelined loads and, for fp16/bf16, wgmma, and with one token chunk as a
    single loop over examples; the rotation GEMM builds for every flag."""
    from source_fast.kernels import _blocks

    cases = []
    for dot, ptr in ((0, "*fp32"), (1, "*fp16"), (2, "*bf16")):
        sig = dict(gs_ptr=ptr, as_ptr=ptr, out_ptr="*fp32", N="i32", T="i32", O="i32", I="i32", n_per_split="i32",
                   stride_os="i32", stride_oo="i32")
        block_o, block_i, block_t, warps, maxnreg = _blocks.PAIR_GPU_BLOCKS[dot]
        cap = {"maxnreg": maxnreg} if maxnreg else {}  # the launcher's register cap
        for one_chunk in (True, False):
            const = dict(BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t, DOT=dot, ACCUMULATE=True,
                         ONE_CHUNK=one_chunk)
            cases.append(("source_fast.kernels.lambda_accum", "_lambda_accum_kernel", sig, const, 90,
                          {"num_warps": warps, **cap, "div16": ["gs_ptr", "as_ptr", "out_ptr", "O", "I", "stride_oo"]}))
    for case, usage in zip(cases, assert_fast_sm90_builds(cases)):
        # One token chunk: the loop over examples is the innermost (pipelined) one, not a token loop of one step.
        assert usage is None or usage["LOOPS"] == (1 if case[3]["ONE_CHUNK"] else 2), (case[3], usage)
    compile_for_gpu([c[:4] + (80,) + c[5:] for c in cases if c[3]["DOT"] != 0])  # Ampere: mma.sync
    compile_for_gpu(bmm_cases({0: "*fp32", 1: "*fp16", 2: "*bf16"}, square=(False, True), accumulate=(False, True)))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,want", [(torch.float32, 0), (torch.float16, 3)], ids=["fp32-ieee", "fp16-tf32"])
def test_lambda_accum_one_token_squares_precision(monkeypatch, dtype, want):
    """The one-token GEMM of squares runs TF32 only for 16-bit inputs (their rotated squares carry no more
    precision), IEEE fp32 for fp32 inputs; the result matches the oracle either way."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common, lambda_accum

    codes = []
    real = _common.bmm
    monkeypatch.setattr(_common, "bmm", lambda *args, **kw: codes.append(kw.get("dot")) or real(*args, **kw))
    a, g, q_a, q_s = _inputs(9, 1, 41, 13, dtype)
    got = lambda_accum.lambda_accum_triton(a, g, q_a, q_s)
    assert codes[-1] == want and (want == 3) == (_common.DOT_TF32 in codes), codes
    baseline = reference.lambda_accum_ref(a, g, q_a, q_s, upcast=False) if dtype != torch.float32 else None
    assert_matches_oracle(got, reference.lambda_accum_ref(a, g, q_a, q_s), op="lambda_accum", backend="triton",
                          dtype=dtype, baseline=baseline)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_lambda_accum_bf16_gpu(backend, t):
    _check(backend, *_inputs(33, t, 131, 67, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_lambda_accum_index_space_above_2_31_gpu(backend, monkeypatch):
    """N·T·I > 2^31 token elements in one launch (int64 row offsets): the chunk budget is raised so
    that no backend splits the examples. Compared with float64 sums over chunks."""
    monkeypatch.setenv("SOURCE_FAST_CHUNK_MIB", "16384")
    n, t, i, o = 4100, 1024, 520, 8
    a = torch.empty(n, t, i, dtype=torch.float16, device="cuda").uniform_(-1, 1)
    g = torch.empty(n, t, o, dtype=torch.float16, device="cuda").uniform_(-1, 1)
    q_a, q_s = eigh_basis(i, "cuda"), eigh_basis(o, "cuda")
    require(backend, "lambda_accum", _tensors(a, g, q_a, q_s))
    got = ops.lambda_accum(a, g, q_a, q_s, backend=backend)
    want = torch.zeros(o, i, dtype=torch.float64, device="cuda")
    for start in range(0, n, 64):
        want += reference.lambda_accum_ref(a[start:start + 64], g[start:start + 64], q_a, q_s)
    baseline_chunks = torch.zeros_like(want)
    for start in range(0, n, 64):
        baseline_chunks += reference.lambda_accum_ref(a[start:start + 64], g[start:start + 64], q_a, q_s,
                                                      upcast=False).double()
    assert_matches_oracle(got, want, op="lambda_accum", backend=backend, dtype=torch.float16,
                          baseline=baseline_chunks)
