"""score_self: every available backend against the float64 reference (source_fast/reference/score.py)."""
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
    weights = torch.rand(o, i, device=device) * 2.0  # f(Λ) ≥ 0
    return a, g, eigh_basis(o, device), eigh_basis(i, device), weights


def _tensors(a, g, q_s, q_a, weights):
    return {"a": a, "g": g, "q_s": q_s, "q_a": q_a, "weights": weights}


def _check(backend, a, g, q_s, q_a, weights, dtype):
    require(backend, "score_self", _tensors(a, g, q_s, q_a, weights))
    got = ops.score_self(a, g, q_s, q_a, weights, backend=backend)
    oracle = reference.score_self_ref(a, g, q_s, q_a, weights)
    baseline = None
    if dtype in (torch.float16, torch.bfloat16):
        baseline = reference.score_self_ref(a, g, q_s, q_a, weights, upcast=False)
    assert_matches_oracle(got, oracle, op="score_self", backend=backend, dtype=dtype, baseline=baseline)
    return got


@pytest.mark.parametrize("n,t,i,o", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_score_self_matches_oracle(backend, dtype, n, t, i, o):
    got = _check(backend, *_inputs(n, t, i, o, dtype), dtype)
    assert got.dtype == torch.float32 and got.shape == (n,)


@pytest.mark.parametrize("gain, order", [pytest.param(float("inf"), "rows", id="rows-first"),
                                         pytest.param(0.0, "materialize", id="G-first")])
@pytest.mark.parametrize("n,t,i,o", [(5, 3, 41, 13), (3, 40, 17, 9), (2, 6, 1, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_score_self_both_rotation_orders_match_oracle(monkeypatch, backend, dtype, gain, order, n, t, i, o):
    """Q_Sᵀ G_n Q_A from rotated token rows or from G_n (_torch_ops.rotation_order), each order forced, chunks of
    one example: against the oracle."""
    monkeypatch.setattr(_torch_ops, "MATERIALIZE_FIRST_MIN_GAIN", gain)
    monkeypatch.setattr(_torch_ops, "_chunk_rows", lambda per_row, dtype, total: 1)
    assert _torch_ops.rotation_order(t, o, i) == order
    _check(backend, *_inputs(n, t, i, o, dtype), dtype)


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_score_self_noncontiguous_eigenvectors(backend, t):
    a, g, q_s, q_a, w = _inputs(7, t, 41, 13, torch.float32)
    assert not q_a.is_contiguous() and not q_s.is_contiguous()
    got = _check(backend, a, g, q_s, q_a, w, torch.float32)
    dense = ops.score_self(a, g, q_s.contiguous(), q_a.contiguous(), w, backend=backend)
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6 * float(dense.abs().max()))
    wrong = ops.score_self(a, g, q_s.T, q_a.T, w, backend=backend)
    assert not torch.allclose(wrong, got, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_self_identity_weights_is_gradient_norm(backend):
    """W = 1: the rotation is orthogonal, so s[n] = ‖G_n‖_F² (a basis-free check of the rotation)."""
    a, g, q_s, q_a, _ = _inputs(5, 3, 41, 13, torch.float32)
    w = torch.ones(13, 41)
    require(backend, "score_self", _tensors(a, g, q_s, q_a, w))
    got = ops.score_self(a, g, q_s, q_a, w, backend=backend)
    norms = reference.per_example_grads_ref(a, g).square().sum((1, 2))
    assert_matches_oracle(got, norms, op="score_self", backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_self_deterministic(backend):
    a, g, q_s, q_a, w = _inputs(5, 5, 80, 20, torch.float32)
    require(backend, "score_self", _tensors(a, g, q_s, q_a, w))
    runs = [ops.score_self(a, g, q_s, q_a, w, backend=backend, deterministic=True) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_score_self_fills_uninitialized_output(backend, t):
    a, g, q_s, q_a, w = _inputs(5, t, 80, 20, torch.float32)
    require(backend, "score_self", _tensors(a, g, q_s, q_a, w))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty → NaN-filled
    try:
        got = ops.score_self(a, g, q_s, q_a, w, backend=backend)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.isfinite(got).all()
    assert_matches_oracle(got, reference.score_self_ref(a, g, q_s, q_a, w), op="score_self", backend=backend,
                          dtype=torch.float32)


@pytest.mark.interpreter
def test_score_self_triton_chunks(monkeypatch):
    """Several chunks of examples (each rotated separately) fill one output, forced in the interpreter."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common, score_self

    monkeypatch.setattr(_common, "chunk_examples", lambda n, per_example: 3)
    a, g, q_s, q_a, w = _inputs(8, 3, 41, 13, torch.float32)
    got = score_self.score_self_triton(a, g, q_s, q_a, w)
    assert_matches_oracle(got, reference.score_self_ref(a, g, q_s, q_a, w), op="score_self", backend="triton",
                          dtype=torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("splits", [2, 3])
def test_score_self_triton_example_splits(monkeypatch, splits):
    """The GPU path's split of each tile's examples over several programs (ragged last split), forced in the
    interpreter, with several output tiles (I = 80 over the interpreter's 64-wide tile)."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common, score_self

    monkeypatch.setattr(_common, "split_count", lambda n, tiles, device, **kw: splits)
    a, g, q_s, q_a, w = _inputs(7, 3, 80, 20, torch.float32)
    got = score_self.score_self_triton(a, g, q_s, q_a, w)
    assert_matches_oracle(got, reference.score_self_ref(a, g, q_s, q_a, w), op="score_self", backend="triton",
                          dtype=torch.float32)


@pytest.mark.slow
def test_score_self_kernels_compile_for_gpu():
    """The fused kernel's GPU blocks build for sm_90, given the launcher's layout (rotated rows and weights
    padded to multiples of 16), with no spills, pipelined loads and, for fp16/bf16, wgmma, and with one token
    chunk without a token loop; the rotation GEMM builds for sm_80."""
    from source_fast.kernels import _blocks

    cases = []
    for dot, ptr in ((0, "*fp32"), (1, "*fp16"), (2, "*bf16")):
        sig = dict(gs_ptr=ptr, as_ptr=ptr, w_ptr="*fp32", ws_ptr="*fp32", N="i32", T="i32", O="i32", I="i32",
                   n_per_split="i32", stride_wst="i32")
        block_o, block_i, block_t, warps, _ = _blocks.PAIR_GPU_BLOCKS[dot]  # score_self takes no register cap
        for one_chunk in (True, False):
            const = dict(BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t, DOT=dot, ONE_CHUNK=one_chunk)
            cases.append(("source_fast.kernels.score_self", "_score_self_kernel", sig, const, 90,
                          {"num_warps": warps, "div16": ["gs_ptr", "as_ptr", "w_ptr", "ws_ptr", "O", "I"]}))
    for case, usage in zip(cases, assert_fast_sm90_builds(cases)):
        # One token chunk: the loop over examples is the innermost (pipelined) one, not a token loop of one step.
        assert usage is None or usage["LOOPS"] == (1 if case[3]["ONE_CHUNK"] else 2), (case[3], usage)
    compile_for_gpu([c[:4] + (80,) + c[5:] for c in cases if c[3]["DOT"] != 0])  # Ampere: mma.sync
    compile_for_gpu(bmm_cases({1: "*fp16"}, arch=80))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_self_bf16_gpu(backend, t):
    _check(backend, *_inputs(33, t, 131, 67, torch.bfloat16, device="cuda"), torch.bfloat16)
