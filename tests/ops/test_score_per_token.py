"""score_per_token: every available backend against the float64 reference (source_fast/reference/score.py).

out[q, n, t] = g_{n,t}ᵀ V_q a_{n,t} with v [Q, O, I], a [N, T, I], g [N, T, O]; the sum over t is
score_pairwise.
"""
import pytest
import torch

from _backends import assert_fast_sm90_builds, at_thread_counts, backend_params, recording_lib_calls, require
from _tolerances import assert_matches_oracle
from source_fast import _dispatch, ops, reference

OP = "score_per_token"


def _serving(params):
    """Backends that implement the op."""
    return [p for p in params if OP in _dispatch.BACKENDS[p.values[0]].ops]


BACKENDS = _serving(backend_params("cpu"))
GPU_BACKENDS = _serving(backend_params("cuda"))
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
SHAPES = [  # (Q, N, T, I, O): sizes 1, odd primes, T = 1 and T > 1, I ≠ O both ways, I and O above the
    # interpreter's 64-wide tiles, N·T above its 128-row tile
    pytest.param(1, 1, 1, 1, 1, id="q1-n1-t1-i1-o1"),
    pytest.param(3, 7, 1, 41, 13, id="q3-n7-t1-i41-o13"),
    pytest.param(2, 7, 3, 123, 41, id="q2-n7-t3-i123-o41"),
    pytest.param(1, 3, 3, 13, 123, id="q1-n3-t3-i13-o123"),
    pytest.param(5, 3, 5, 80, 20, id="q5-n3-t5-i80-o20"),
    pytest.param(2, 2, 70, 17, 9, id="q2-n2-t70-i17-o9"),
]


def _inputs(q, n, t, i, o, dtype, device="cpu"):
    v = torch.randn(q, o, i, device=device).to(dtype)
    a = torch.randn(n, t, i, device=device).to(dtype)
    g = torch.randn(n, t, o, device=device).to(dtype)
    return v, a, g


def _check(backend, v, a, g, dtype):
    require(backend, OP, {"v": v, "a": a, "g": g})
    got = ops.score_per_token(v, a, g, backend=backend)
    oracle = reference.score_per_token_ref(v, a, g)
    baseline = reference.score_per_token_ref(v, a, g, upcast=False) if dtype in (torch.float16, torch.bfloat16) \
        else None
    assert_matches_oracle(got, oracle, op=OP, backend=backend, dtype=dtype, baseline=baseline)
    return got, oracle


@pytest.mark.parametrize("q,n,t,i,o", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_score_per_token_matches_oracle(backend, dtype, q, n, t, i, o):
    got, _ = _check(backend, *_inputs(q, n, t, i, o, dtype), dtype)
    assert got.dtype == torch.float32 and got.shape == (q, n, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_per_token_sums_to_pairwise(backend):
    v, a, g = _inputs(3, 5, 4, 9, 6, torch.float32)
    require(backend, OP, {"v": v, "a": a, "g": g})
    got = ops.score_per_token(v, a, g, backend=backend)
    assert_matches_oracle(got.sum(-1), reference.score_pairwise_ref(v, a, g), op="score_pairwise", backend=backend,
                          dtype=torch.float32)


def test_score_per_token_float64_runs_on_torch():
    v, a, g = _inputs(3, 5, 4, 9, 6, torch.float64)
    assert _dispatch.select(OP, {"v": v, "a": a, "g": g})[0] == "torch"
    got = ops.score_per_token(v, a, g)
    assert got.dtype == torch.float64 and got.shape == (3, 5, 4)
    assert_matches_oracle(got, reference.score_per_token_ref(v, a, g), op=OP, backend="torch", dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_per_token_strided_inputs(backend):
    """Non-contiguous views (a transposed query batch, a token-strided slice, permuted g) are read correctly."""
    v = torch.randn(13, 41, 3).permute(2, 0, 1)  # [3, 13, 41], not contiguous
    a = torch.randn(5, 6, 41)[:, ::2]             # [5, 3, 41], token stride 2
    g = torch.randn(13, 3, 5).permute(2, 1, 0)    # [5, 3, 13]
    assert not any(x.is_contiguous() for x in (v, a, g))
    _check(backend, v, a, g, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_per_token_deterministic(backend):
    v, a, g = _inputs(4, 3, 50, 80, 70, torch.float32)
    require(backend, OP, {"v": v, "a": a, "g": g})
    runs = [ops.score_per_token(v, a, g, backend=backend, deterministic=True) for _ in range(3)]
    assert all(torch.equal(runs[0], x) for x in runs[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_per_token_fills_uninitialized_output(backend):
    v, a, g = _inputs(5, 41, 3, 13, 9, torch.float32)
    require(backend, OP, {"v": v, "a": a, "g": g})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty → NaN-filled
    try:
        got = ops.score_per_token(v, a, g, backend=backend)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.isfinite(got).all()
    assert_matches_oracle(got, reference.score_per_token_ref(v, a, g), op=OP, backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_per_token_empty_dimensions(backend):
    """T = 0 gives an empty [Q, N, 0]; O = 0 or I = 0 gives zeros."""
    for t, i, o in ((0, 5, 4), (3, 0, 4), (3, 5, 0)):
        v, a, g = _inputs(2, 3, t, i, o, torch.float32)
        require(backend, OP, {"v": v, "a": a, "g": g})
        got = ops.score_per_token(v, a, g, backend=backend)
        assert got.shape == (2, 3, t) and torch.equal(got, torch.zeros(2, 3, t))


def test_score_per_token_validates_shapes():
    with pytest.raises(ValueError, match="v must have size 9 in dimension 2"):
        ops.score_per_token(torch.randn(2, 6, 8), torch.randn(5, 1, 9), torch.randn(5, 1, 6))
    with pytest.raises(ValueError, match="g must have size 1 in dimension 1"):
        ops.score_per_token(torch.randn(2, 6, 9), torch.randn(5, 1, 9), torch.randn(5, 2, 6))


def test_score_per_token_dispatch_and_explain():
    """CPU tensors go to the C++ backend (score_pairwise's one-token kernels on the token rows), and `explain` names
    the kernel."""
    v, a, g = _inputs(2, 5, 3, 4, 3, torch.float32)
    require("cpu", OP, {"v": v, "a": a, "g": g})
    table = ops.explain(OP, v, a, g)
    rows = {line.split("|")[0].strip(): line.split("|", 1)[1].strip() for line in table.splitlines()[1:]}
    assert rows["cpu"] == "selected" and rows["torch"] == "available (lower priority)"
    assert rows["form"].startswith("cpu: token-wise")
    assert ops.explain(OP, v=v, a=a, g=g) == table


def test_score_per_token_cpu_sparse_g_on_token_rows():
    """Exact zeros in g (ReLU-gated output gradients) take the sparse-g kernel on the token rows, as score_pairwise
    does for one-token examples: `explain` says so, that kernel is what runs, once per call, bitwise the same at
    one and two threads, and it matches the oracle."""
    gen = torch.Generator().manual_seed(3)
    q, n, t, i, o = 40, 60, 3, 19, 47  # Q and N·T·O above the sparse kernel's thresholds
    v, a = torch.randn(q, o, i, generator=gen), torch.randn(n, t, i, generator=gen)
    g = torch.randn(n, t, o, generator=gen) * (torch.rand(n, t, o, generator=gen) < 0.3)
    require("cpu", OP, {"v": v, "a": a, "g": g})
    assert ops.explain(OP, v, a, g).splitlines()[-1].startswith("form     | cpu: sparse g")
    with recording_lib_calls() as recorded:
        runs = at_thread_counts(lambda: ops.score_per_token(v, a, g, backend="cpu"))
    assert [name for name, _ in recorded] == ["score_pairwise_sparse_g_cpu"] * 2
    assert torch.equal(runs[0], runs[1])
    assert_matches_oracle(runs[0], reference.score_per_token_ref(v, a, g), op=OP, backend="cpu", dtype=torch.float32)


@pytest.mark.slow
def test_score_per_token_kernel_compiles_for_gpu():
    """The token-wise GEMM compiles to sm_80 and sm_90 code for every input dtype and grid order. Given the
    launcher's layout (o and i padded to multiples of 16, unit strides that Triton's JIT specialises), the sm_90
    builds of the GPU tiles (kernels/_blocks.PER_TOKEN_GPU_BLOCKS) have no spills, pipelined loads (asynchronous
    copies) and, for fp16/bf16, wgmma."""
    from source_fast.kernels import _blocks

    cases = []
    for dot, ptr, archs in ((0, "*fp32", (90,)), (1, "*fp16", (80, 90)), (2, "*bf16", (80, 90)),
                            (4, "*fp32", (80, 90))):  # 4: 3xTF32, where FP32_TENSOR_CORES turns it on
        sig = dict(v_ptr=ptr, a_ptr=ptr, g_ptr=ptr, out_ptr="*fp32", O="i32", I="i32", ROWS="i64",
                   row_start="i64", q_start="i64", s_vq="i64", s_vo="i32", s_ar="i64", s_gr="i64", s_oq="i64")
        div16 = ["v_ptr", "a_ptr", "g_ptr", "s_vq", "s_vo", "s_ar", "s_gr", "O", "I"]
        block_m, block_o, block_i, warps, stages = _blocks.PER_TOKEN_GPU_BLOCKS[dot]
        for rows_fastest in (False, True):
            const = dict(BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_I=block_i, DOT=dot, ROWS_FASTEST=rows_fastest,
                         s_vi=1, s_ai=1, s_go=1)
            cases += [("source_fast.kernels.score_per_token", "_score_per_token_kernel", sig, const, arch,
                       {"num_warps": warps, "num_stages": stages, "div16": div16}) for arch in archs]
    assert_fast_sm90_builds(cases)


@pytest.fixture
def fp32_on_tensor_cores(blocks_override):
    """_blocks.FP32_TENSOR_CORES on for the token-wise GEMM: fp32 as 3xTF32 (DOT_F32X3)."""
    blocks_override({"FP32_TENSOR_CORES": {"per_token": [1]}})


@pytest.mark.interpreter
def test_score_per_token_triton_fp32_as_3xtf32(fp32_on_tensor_cores, monkeypatch):
    """With FP32_TENSOR_CORES on, the token-wise GEMM (score_per_token, and score_pairwise's fp32 one-token form)
    takes the 3xTF32 dot and matches the oracle at fp32's tolerance (in fp32 arithmetic in the interpreter; the
    GPU test below holds the tensor cores to it)."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks, _common

    dots = []
    real = _blocks.per_token_blocks
    monkeypatch.setattr(_blocks, "per_token_blocks", lambda r, o, i, dot: dots.append(dot) or real(r, o, i, dot))
    v, a, g = _inputs(5, 7, 3, 37, 21, torch.float32)
    _check("triton", v, a, g, torch.float32)
    got = ops.score_pairwise(v[..., :], a[:, :1], g[:, :1], backend="triton")
    assert_matches_oracle(got, reference.score_pairwise_ref(v, a[:, :1], g[:, :1]), op="score_pairwise",
                          backend="triton", dtype=torch.float32)
    assert dots and set(dots) == {_common.DOT_F32X3}  # (a first use also runs the backend's self-test)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 9])
def test_score_per_token_fp32_as_3xtf32_gpu(fp32_on_tensor_cores, t):
    """3xTF32 on the tensor cores keeps fp32's tolerance against the float64 oracle."""
    _check("triton", *_inputs(7, 45, t, 131, 67, torch.float32, device="cuda"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("q,n,t,i,o", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_per_token_matches_oracle_gpu(backend, dtype, q, n, t, i, o):
    _check(backend, *_inputs(q, n, t, i, o, dtype, device="cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 9])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_per_token_bf16_gpu(backend, t):
    """bf16: error vs the float64 oracle ≤ 2 × the bf16 torch reference's error (+ slack)."""
    _check(backend, *_inputs(7, 45, t, 131, 67, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_per_token_strided_gpu(backend):
    v = torch.randn(131, 7, 67, device="cuda").permute(1, 2, 0)
    a = torch.randn(45, 18, 131, device="cuda")[:, ::2]
    g = torch.randn(67, 9, 45, device="cuda").permute(2, 1, 0)
    _check(backend, v, a, g, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_per_token_deterministic_gpu(backend, dtype):
    v, a, g = _inputs(9, 200, 5, 130, 70, dtype, device="cuda")
    require(backend, OP, {"v": v, "a": a, "g": g})
    first = ops.score_per_token(v, a, g, backend=backend, deterministic=True)
    for _ in range(49):  # 50 runs in all
        assert torch.equal(first, ops.score_per_token(v, a, g, backend=backend, deterministic=True))


@pytest.mark.interpreter
@pytest.mark.parametrize("rows_fastest", [False, True], ids=["queries-fastest", "rows-fastest"])
def test_score_per_token_triton_grid_orders_and_chunks(monkeypatch, rows_fastest):
    """Both grid orders (row tiles or queries on the fastest axis), each with its slower axis split into
    launches (forced down to 2 per launch), over several row tiles and queries with ragged edges; and
    score_pairwise's one-token path through the same kernel."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks, _common, score_per_token as kernel

    monkeypatch.setattr(kernel, "ROWS_FASTEST_V_BYTES", -1 if rows_fastest else 1 << 62)
    monkeypatch.setattr(_common, "MAX_GRID_YZ", 2)
    monkeypatch.setattr(_blocks, "per_token_blocks", lambda rows, o, i, dot: (16, 16, 16, 4, 1))
    v, a, g = _inputs(5, 13, 3, 23, 19, torch.float32)  # 5 queries (3 launches), 39 rows = 3 tiles
    _check("triton", v, a, g, torch.float32)
    v1, a1, g1 = _inputs(5, 37, 1, 23, 19, torch.float32)  # one token: score_pairwise runs the same kernel
    got = ops.score_pairwise(v1, a1, g1, backend="triton")
    assert_matches_oracle(got, reference.score_pairwise_ref(v1, a1, g1), op="score_pairwise", backend="triton",
                          dtype=torch.float32)
