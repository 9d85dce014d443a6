"""score_lowrank: every available backend against the float64 reference (source_fast/reference/score.py).

scores[q, n] = Σ_t Σ_r (U_qᵀ g_{n,t})_r (W_qᵀ a_{n,t})_r with u [Q, O, R], w [Q, I, R], a [N, T, I],
g [N, T, O]. The oracle forms V_q = U_q W_qᵀ densely in float64; no backend may.
"""
import pytest
import torch

from _backends import assert_fast_sm90_builds, backend_params, require
from _tolerances import assert_matches_oracle
from source_fast import _dispatch, ops, reference

OP = "score_lowrank"


def _serving(params):
    """Backends that implement the op."""
    return [p for p in params if OP in _dispatch.BACKENDS[p.values[0]].ops]


BACKENDS = _serving(backend_params("cpu"))
GPU_BACKENDS = _serving(backend_params("cuda"))
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
SHAPES = [  # (Q, N, T, I, O, R): sizes 1, odd primes, T = 1 and T > 1, I ≠ O both ways; U_q/W_q resident
    # in one tile and not (I = 123 or O = 70 above the interpreter's 64-wide tile, R = 70 above its
    # 64 ranks), T above its 64-token block
    pytest.param(1, 1, 1, 1, 1, 1, id="q1-n1-t1-i1-o1-r1"),
    pytest.param(3, 7, 1, 41, 13, 2, id="q3-n7-t1-i41-o13-r2"),
    pytest.param(4, 5, 3, 9, 6, 3, id="q4-n5-t3-i9-o6-r3"),
    pytest.param(2, 3, 70, 123, 41, 5, id="q2-n3-t70-i123-o41-r5"),
    pytest.param(2, 41, 2, 20, 70, 70, id="q2-n41-t2-i20-o70-r70"),
    pytest.param(1, 2, 5, 13, 41, 1, id="q1-n2-t5-i13-o41-r1"),
]


def _inputs(q, n, t, i, o, r, dtype, device="cpu"):
    u = torch.randn(q, o, r, device=device).to(dtype)
    w = torch.randn(q, i, r, device=device).to(dtype)
    a = torch.randn(n, t, i, device=device).to(dtype)
    g = torch.randn(n, t, o, device=device).to(dtype)
    return u, w, a, g


def _check(backend, u, w, a, g, dtype):
    require(backend, OP, {"u": u, "w": w, "a": a, "g": g})
    got = ops.score_lowrank(u, w, a, g, backend=backend)
    oracle = reference.score_lowrank_ref(u, w, a, g)
    baseline = reference.score_lowrank_ref(u, w, a, g, upcast=False) if dtype in (torch.float16, torch.bfloat16) \
        else None
    assert_matches_oracle(got, oracle, op=OP, backend=backend, dtype=dtype, baseline=baseline)
    return got, oracle


@pytest.mark.parametrize("q,n,t,i,o,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_score_lowrank_matches_oracle(backend, dtype, q, n, t, i, o, r):
    got, _ = _check(backend, *_inputs(q, n, t, i, o, r, dtype), dtype)
    assert got.dtype == torch.float32 and got.shape == (q, n)


def test_score_lowrank_float64_runs_on_torch():
    u, w, a, g = _inputs(3, 7, 3, 41, 13, 2, torch.float64)
    assert _dispatch.select(OP, {"u": u, "w": w, "a": a, "g": g})[0] == "torch"
    got = ops.score_lowrank(u, w, a, g)
    assert got.dtype == torch.float64
    assert_matches_oracle(got, reference.score_lowrank_ref(u, w, a, g), op=OP, backend="torch", dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_lowrank_equals_dense_pairwise(backend):
    """Low-rank queries score exactly as their dense V_q = U_q W_qᵀ through score_pairwise."""
    u, w, a, g = _inputs(3, 9, 4, 41, 13, 3, torch.float32)
    require(backend, OP, {"u": u, "w": w, "a": a, "g": g})
    dense = ops.score_pairwise(u @ w.transpose(1, 2), a, g, backend="torch")
    assert_matches_oracle(ops.score_lowrank(u, w, a, g, backend=backend), dense.double(), op=OP, backend=backend,
                          dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_lowrank_strided_inputs(backend):
    """Non-contiguous views (permuted factors, a token-strided slice, transposed features) are read correctly."""
    u = torch.randn(3, 41, 2).permute(2, 1, 0)           # [2, 41, 3]: Q=2, O=41, R=3
    w = torch.randn(2, 3, 13).transpose(1, 2)            # [2, 13, 3]: I=13
    a = torch.randn(5, 6, 13)[:, ::2]                    # [5, 3, 13], token stride 2
    g = torch.randn(41, 3, 5).permute(2, 1, 0)           # [5, 3, 41]
    assert not any(x.is_contiguous() for x in (u, w, a, g))
    _check(backend, u, w, a, g, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_lowrank_mixed_precision_factors(backend):
    """fp32 factors with fp16 tokens: the factors are not rounded to fp16 (the dots run in fp32)."""
    u, w, _, _ = _inputs(2, 7, 3, 41, 13, 4, torch.float32)
    _, _, a, g = _inputs(2, 7, 3, 41, 13, 4, torch.float16)
    require(backend, OP, {"u": u, "w": w, "a": a, "g": g})
    got = ops.score_lowrank(u, w, a, g, backend=backend)
    oracle = reference.score_lowrank_ref(u, w, a, g)
    # exact fp16 tokens, fp32 factors: fp32-level agreement
    assert_matches_oracle(got, oracle, op=OP, backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_lowrank_deterministic(backend):
    u, w, a, g = _inputs(3, 7, 70, 20, 70, 70, torch.float32)
    require(backend, OP, {"u": u, "w": w, "a": a, "g": g})
    runs = [ops.score_lowrank(u, w, a, g, backend=backend, deterministic=True) for _ in range(3)]
    assert all(torch.equal(runs[0], x) for x in runs[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_lowrank_fills_uninitialized_output(backend):
    u, w, a, g = _inputs(5, 41, 3, 13, 9, 4, torch.float32)
    require(backend, OP, {"u": u, "w": w, "a": a, "g": g})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty → NaN-filled
    try:
        got = ops.score_lowrank(u, w, a, g, backend=backend)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.isfinite(got).all()
    assert_matches_oracle(got, reference.score_lowrank_ref(u, w, a, g), op=OP, backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_lowrank_empty_reductions(backend):
    """T = 0 or R = 0: every score is an empty sum, 0."""
    for t, r in ((0, 2), (3, 0)):
        u, w, a, g = _inputs(2, 3, t, 5, 4, r, torch.float32)
        require(backend, OP, {"u": u, "w": w, "a": a, "g": g})
        got = ops.score_lowrank(u, w, a, g, backend=backend)
        assert got.shape == (2, 3) and torch.equal(got, torch.zeros(2, 3))


def test_score_lowrank_validates_shapes():
    with pytest.raises(ValueError, match="w must have size 9 in dimension 1"):
        ops.score_lowrank(torch.randn(2, 6, 3), torch.randn(2, 8, 3), torch.randn(5, 1, 9), torch.randn(5, 1, 6))
    with pytest.raises(ValueError, match="u must have size 6 in dimension 1"):
        ops.score_lowrank(torch.randn(2, 5, 3), torch.randn(2, 9, 3), torch.randn(5, 1, 9), torch.randn(5, 1, 6))


def test_score_lowrank_dispatch_and_explain():
    """On CPU the compiled backend (two compiled GEMMs per chunk) is selected when built; torch otherwise."""
    u, w, a, g = _inputs(2, 5, 1, 4, 3, 2, torch.float32)
    table = ops.explain(OP, u, w, a, g)
    rows = {line.split("|")[0].strip(): line.split("|", 1)[1].strip() for line in table.splitlines()[1:]}
    built = _dispatch.BACKENDS["cpu"].availability() is None
    assert rows["cpu" if built else "torch"] == "selected"
    assert ops.explain(OP, u=u, w=w, a=a, g=g) == table


@pytest.mark.slow
def test_score_lowrank_kernel_compiles_for_gpu(monkeypatch):
    """The Triton kernel compiles to sm_80 and sm_90 code, U_q/W_q resident in registers and streamed, several
    queries per program and one. Given the launcher's layout (o, i, r padded to multiples of 16, unit strides
    that Triton's JIT specialises), the sm_90 builds have no spills, pipelined loads (asynchronous copies) and,
    for fp16/bf16, wgmma dots."""
    from source_fast.kernels import _blocks

    monkeypatch.setattr(_blocks, "interpreting", lambda: False)  # the GPU configurations
    cases = []
    for dot, ptr, archs in ((0, "*fp32", (90,)), (1, "*fp16", (80, 90)), (2, "*bf16", (80, 90))):
        sig = dict(u_ptr=ptr, w_ptr=ptr, a_ptr=ptr, g_ptr=ptr, out_ptr="*fp32", Q="i32", N="i32", T="i32", O="i32",
                   I="i32", R="i32", n_start="i64", s_uq="i64", s_uo="i32", s_wq="i64", s_wi="i32",
                   s_an="i64", s_at="i64", s_gn="i64", s_gt="i64", s_oq="i64")
        div16 = ["u_ptr", "w_ptr", "a_ptr", "g_ptr", "s_uq", "s_uo", "s_wq", "s_wi", "s_an", "s_at", "s_gn", "s_gt",
                 "O", "I", "R"]
        # (Q, T, O = I, R): resident and streamed, one token and 16, ranks filling the columns with several queries
        # or with one query (and, above the columns, in rank steps)
        for q, t, width, r in ((256, 1, 64, 32), (256, 16, 64, 32), (256, 1, 1024, 32), (256, 16, 1024, 32),
                               (256, 16, 1024, 256)):
            cfg = _blocks.lowrank_blocks(q, 4096, t, width, width, r, dot)
            const = dict(BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o,
                         BLOCK_I=cfg.block_i, BLOCK_R=cfg.block_r, RESIDENT=cfg.resident, DOT=dot, s_ur=1, s_wr=1,
                         s_ai=1, s_go=1, s_on=1)
            cases += [("source_fast.kernels.score_lowrank", "_score_lowrank_kernel", sig, const, arch,
                       {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "div16": div16}) for arch in archs]
    assert_fast_sm90_builds(cases)


@pytest.mark.gpu
@pytest.mark.parametrize("q,n,t,i,o,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_lowrank_matches_oracle_gpu(backend, dtype, q, n, t, i, o, r):
    _check(backend, *_inputs(q, n, t, i, o, r, dtype, device="cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(7, 45, 1, 131, 67, 5), (7, 45, 9, 131, 67, 80), (5, 130, 3, 41, 13, 7)],
                         ids=["t1-streamed", "t9-r80-streamed", "t3-resident"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_lowrank_bf16_gpu(backend, shape):
    """bf16: error vs the float64 oracle ≤ 2 × the bf16 torch reference's error (+ slack)."""
    _check(backend, *_inputs(*shape, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_lowrank_strided_gpu(backend):
    u = torch.randn(3, 67, 5, device="cuda").permute(2, 1, 0)
    w = torch.randn(5, 3, 131, device="cuda").permute(0, 2, 1)
    a = torch.randn(45, 18, 131, device="cuda")[:, ::2]
    g = torch.randn(67, 9, 45, device="cuda").permute(2, 1, 0)
    _check(backend, u, w, a, g, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_score_lowrank_deterministic_gpu(backend, dtype):
    u, w, a, g = _inputs(9, 200, 5, 130, 70, 17, dtype, device="cuda")
    require(backend, OP, {"u": u, "w": w, "a": a, "g": g})
    first = ops.score_lowrank(u, w, a, g, backend=backend, deterministic=True)
    for _ in range(49):  # 50 runs in all
        assert torch.equal(first, ops.score_lowrank(u, w, a, g, backend=backend, deterministic=True))
