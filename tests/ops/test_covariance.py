"""covariance: every available backend against the float64 reference (source_fast/reference/covariance.py)."""
import pytest
import torch

from _backends import assert_fast_sm90_builds, at_thread_counts, backend_params, compile_for_gpu, require
from _asserts import assert_close_report
from _tolerances import assert_matches_oracle
from source_fast import ops, reference

BACKENDS = backend_params("cpu")
GPU_BACKENDS = backend_params("cuda")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
SHAPES = [  # (R, D): size 1, odd primes, D above the interpreter's 64-wide tile (mirrored tiles)
    pytest.param(1, 1, id="r1-d1"),
    pytest.param(7, 13, id="r7-d13"),
    pytest.param(97, 41, id="r97-d41"),
    pytest.param(131, 80, id="r131-d80"),
]
MASKS = ["none", "bool", "float"]

def _inputs(r, d, dtype, mask_kind, device="cpu"):
    x = torch.randn(r, d, device=device).to(dtype)
    if mask_kind == "none":
        return x, None
    if mask_kind == "bool":
        mask = torch.rand(r, device=device) > 0.3
        mask[0] = True
        return x, mask
    return x, torch.rand(r, device=device) * 2.0  # float row weights


def _check(backend, x, mask, dtype, out=None, name=None):
    require(backend, "covariance", {"x": x} if out is None else {"x": x, "out": out})
    got = ops.covariance(x, mask, out=out, backend=backend)
    oracle = reference.covariance_ref(x, mask)
    baseline = reference.covariance_ref(x, mask, upcast=False) if dtype in (torch.float16, torch.bfloat16) else None
    return got, assert_matches_oracle(got, oracle, op="covariance", backend=backend, dtype=dtype, baseline=baseline,
                                      name=name)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("r,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_covariance_matches_oracle(request, backend, dtype, r, d, mask_kind):
    x, mask = _inputs(r, d, dtype, mask_kind)
    got, _ = _check(backend, x, mask, dtype)
    assert got.dtype == torch.float32 and got.shape == (d, d)
    assert torch.equal(got, got.T), "covariance must be exactly symmetric"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=["out-fp32", "out-fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_covariance_out_accumulates(backend, out_dtype):
    """out ← sym(out + C) = (out + outᵀ)/2 + C, updated in place and returned."""
    x, mask = _inputs(53, 41, torch.float32, "bool")
    start = torch.randn(41, 41, dtype=out_dtype)  # deliberately not symmetric
    out = start.clone()
    require(backend, "covariance", {"x": x, "out": out})
    ret = ops.covariance(x, mask, out=out, backend=backend)
    assert ret.data_ptr() == out.data_ptr()
    s = start.double()
    expected = (s + s.T) / 2 + reference.covariance_ref(x, mask)
    assert_matches_oracle(out, expected, op="covariance", backend=backend, dtype=torch.float32)
    assert torch.equal(out, out.T)
    # a second call keeps accumulating
    ops.covariance(x, mask, out=out, backend=backend)
    assert_matches_oracle(out, expected + reference.covariance_ref(x, mask), op="covariance", backend=backend,
                          dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_covariance_deterministic(backend):
    x, mask = _inputs(131, 80, torch.float32, "bool")
    require(backend, "covariance", {"x": x})
    runs = [ops.covariance(x, mask, backend=backend, deterministic=True) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_covariance_fills_uninitialized_output(backend):
    """Under use_deterministic_algorithms(True) torch.empty is NaN-filled: any unwritten element shows."""
    x, mask = _inputs(97, 80, torch.float32, "bool")
    require(backend, "covariance", {"x": x})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = ops.covariance(x, mask, backend=backend)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.isfinite(got).all()
    assert_matches_oracle(got, reference.covariance_ref(x, mask), op="covariance", backend=backend,
                          dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_covariance_strided_input(backend):
    x = torch.randn(80, 29)[:, ::2]  # row stride 29, column stride 2
    require(backend, "covariance", {"x": x})
    assert_matches_oracle(ops.covariance(x, backend=backend), reference.covariance_ref(x), op="covariance",
                          backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("d", [1, 16, 40, 256, 257], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("mask_kind", ["none", "float"])
def test_covariance_cpu_many_rows_narrow_and_wide(d, mask_kind):
    """Several groups of rows (the C++ kernel sums narrow factors, D <= 256, in groups of whole 256-row chunks
    sized by R alone, then the groups in order; D = 257 takes the tile-parallel path): the oracle, accumulation
    into out, strided rows, and the same bits at 1 and 2 threads."""
    r = 2 * 4096 + 301
    x, mask = _inputs(r, d, torch.float32, mask_kind)
    require("cpu", "covariance", {"x": x})
    got, _ = _check("cpu", x, mask, torch.float32)
    assert torch.equal(got, got.T)
    one, two = at_thread_counts(lambda: ops.covariance(x, mask, backend="cpu"))
    assert torch.equal(one, two)
    start = torch.randn(d, d)
    out = start.clone()
    ops.covariance(x, mask, out=out, backend="cpu")
    expected = (start.double() + start.double().T) / 2 + reference.covariance_ref(x, mask)
    assert_matches_oracle(out, expected, op="covariance", backend="cpu", dtype=torch.float32)
    wide = torch.randn(r, 2 * d + 1)[:, ::2]  # column stride 2
    assert_matches_oracle(ops.covariance(wide, backend="cpu"), reference.covariance_ref(wide), op="covariance",
                          backend="cpu", dtype=torch.float32)


def test_covariance_cpu_more_groups_than_one_wave():
    """Past 64 row groups (about 5·10⁵ rows) the C++ kernel sums its partials a wave of 64 at a time, still in group
    order: the oracle and the same bits at 1 and 2 threads."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(600_000, 3, generator=gen)
    mask = torch.rand(600_000, generator=gen) * 2.0
    require("cpu", "covariance", {"x": x, "mask": mask})
    one, two = at_thread_counts(lambda: ops.covariance(x, mask, backend="cpu"))
    assert torch.equal(one, two)
    assert_matches_oracle(one, reference.covariance_ref(x, mask), op="covariance", backend="cpu", dtype=torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("with_out", [False, True], ids=["fresh", "out"])
def test_covariance_triton_split_rows(splits, with_out):
    """The GPU path for long row reductions (fixed-order partial sums), forced in the interpreter."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels.covariance import _covariance

    x, mask = _inputs(200, 41, torch.float32, "float")
    out = torch.randn(41, 41) if with_out else None
    start = None if out is None else out.clone().double()
    got = _covariance(x, mask, out, splits)
    expected = reference.covariance_ref(x, mask)
    if start is not None:
        expected = expected + (start + start.T) / 2
        assert got.data_ptr() == out.data_ptr()
    assert_matches_oracle(got, expected, op="covariance", backend="triton", dtype=torch.float32)
    assert torch.equal(got, got.T)


def test_covariance_auto_splits_fill_the_gpu_within_the_workspace(monkeypatch):
    """The split heuristic as a GPU with 132 SMs would see it (no GPU needed): a small D with one tile gets
    two partial sums per SM (the memory-bound case), a large D stays at the generic rules."""
    pytest.importorskip("triton")
    from source_fast.kernels import _common
    from source_fast.kernels.covariance import auto_splits

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert auto_splits(2**24, 32, 64, 1, cuda) == 264  # was capped at 64: half the SMs idle
    assert auto_splits(2**24, 32, 64, 1, torch.device("cpu")) == 1
    assert auto_splits(64 * 40, 32, 64, 1, cuda) == 10  # at least 4 row blocks per split
    assert auto_splits(65536, 2049, 64, 136, cuda) == 2  # many tiles: as before
    assert auto_splits(2**20, 4097, 64, 1, cuda) == 64  # a huge workspace per split: the generic cap
    # lambda_accum's reduction over examples uses the same rule: a 64 x 64 layer, one tile, 100k examples
    assert _common.split_count(100_000, 1, cuda, split_bytes=4 * 64 * 64) == 264
    assert _common.split_count(100_000, 1, cuda) == 64  # without split_bytes: the generic cap


@pytest.mark.interpreter
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("d,dtype,mask_kind", [
    pytest.param(37, torch.float32, "float", id="tiles3-nested"),
    pytest.param(13, torch.float32, "none", id="tile1-one-loop"),
    pytest.param(13, torch.float16, "float", id="tile1-one-loop-mask"),
])
def test_covariance_triton_promoted_row_chunks(monkeypatch, splits, d, dtype, mask_kind):
    """Row chunks summed apart and then added (the guard against tensor-core accumulator truncation),
    forced down to two K-steps per chunk so splits end inside a chunk and chunks end inside a K-step; in the
    nested loops of several tiles and in the single loop of one (narrow) tile."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks, _common
    from source_fast.kernels.covariance import _covariance

    monkeypatch.setattr(_common, "PROMOTE_STEPS", 2)
    monkeypatch.setattr(_blocks, "covariance_blocks", lambda r, d, element_bytes=2: (16, 16, 4))
    x, mask = _inputs(203, d, dtype, mask_kind)
    got = _covariance(x, mask, None, splits)
    assert_matches_oracle(got, reference.covariance_ref(x, mask), op="covariance", backend="triton", dtype=dtype,
                          baseline=reference.covariance_ref(x, mask, upcast=False) if dtype != torch.float32 else None)
    assert torch.equal(got, got.T)


@pytest.mark.interpreter
@pytest.mark.parametrize("with_mask", [False, True])
def test_covariance_triton_both_flushes_sum_the_same_chunks(monkeypatch, with_mask):
    """The row loop's two ways of flushing a chunk (a select for the narrow case, a branch for the wide one) sum the
    same chunks in the same order: the same bits, with the rows read once (y is x) or twice (y a copy, as on
    sm_80)."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks, _common
    from source_fast.kernels.covariance import _covariance_rows

    monkeypatch.setattr(_common, "PROMOTE_STEPS", 2)
    monkeypatch.setattr(_blocks, "covariance_blocks", lambda r, d, element_bytes=2: (16, 16, 4))
    x = torch.randn(203, 16).to(torch.float16)
    m = torch.rand(203) * 2.0 if with_mask else None
    branch = _covariance_rows(x, x, m, None, 1, _common.DOT_F16, select_flush=False)
    assert torch.equal(_covariance_rows(x, x, m, None, 1, _common.DOT_F16), branch)
    assert torch.equal(_covariance_rows(x, x.clone(), m, None, 1, _common.DOT_F16), branch)


@pytest.mark.slow
def test_covariance_kernel_compiles_for_gpu():
    """The GPU blocks of the wide and the narrow (one-tile) case build for sm_90, given the launcher's layout
    (rows padded to a multiple of 16), with no spills, pipelined loads (asynchronous copies), shared memory
    within an H100's limit and, for fp16/bf16, wgmma; both cases as a single loop; fp32 runs the in-kernel
    mask only in fp16/bf16 (the launcher weights fp32 rows). Both the default tiles and the ones measured on
    sm_90 (`_tuned_blocks`), each with the rows per step the launcher takes for the dtype: the measured 16-bit
    narrow tile once asked fp32 for more shared memory than an H100 has."""
    from source_fast.kernels import _blocks, _common, _tuned_blocks

    tables = [dict(_blocks.COVARIANCE_GPU_BLOCKS)]
    measured = _tuned_blocks.TUNED.get("sm_90", {}).get("best", {}).get("COVARIANCE_GPU_BLOCKS")
    if measured:
        tables.append({**tables[0], **{k: tuple(v) for k, v in measured.items()}})
    cases = []
    try:
        for table in tables:
            _blocks.override_blocks({"COVARIANCE_GPU_BLOCKS": table})
            for dot, ptr, element in ((0, "*fp32", 4), (1, "*fp16", 2), (2, "*bf16", 2)):
                for d in (32, 2048):
                    block_d, block_r, warps = _blocks.covariance_blocks(1 << 20, d, element)
                    for has_mask in ((False,) if dot == 0 else (False, True)):
                        sig = dict(x_ptr=ptr, y_ptr=ptr, m_ptr="*fp32", out_ptr="*fp32", pairs_ptr="*i32", R="i64",
                                   D="i32", rows_per_split="i64", stride_xr="i32", stride_os="i32", stride_or="i32")
                        const = dict(BLOCK_D=block_d, BLOCK_R=block_r, CHUNK_R=block_r * _common.PROMOTE_STEPS,
                                     DOT=dot, HAS_MASK=has_mask, ACCUMULATE=has_mask, SELECT_FLUSH=d <= block_d,
                                     SHARE_ROWS=d <= block_d)
                        div16 = ["x_ptr", "y_ptr", "m_ptr", "out_ptr", "D", "rows_per_split", "stride_xr",
                                 "stride_os", "stride_or"]
                        cases.append(("source_fast.kernels.covariance", "_covariance_kernel", sig, const, 90,
                                      {"num_warps": warps, "div16": div16}))
    finally:
        _blocks.override_blocks(None)
    cases = [c for i, c in enumerate(cases) if c not in cases[:i]]
    for case, usage in zip(cases, assert_fast_sm90_builds(cases)):
        # One row loop in both cases: nested, the pipeline drained every CHUNK_R rows.
        assert usage is None or usage["LOOPS"] == 1, (case[3], usage)
    # Ampere (mma.sync): the narrow case reads its rows twice there (`_common.shares_dot_operands`), which the
    # build pipelines (read once, it had no asynchronous copies).
    ampere = [c[:3] + (dict(c[3], SHARE_ROWS=False), 80) + c[5:] for c in cases[:len(cases) // len(tables)]
              if c[3]["DOT"] != 0]
    for case, usage in zip(ampere, compile_for_gpu(ampere)):
        assert usage is None or usage["LDGSTS"] > 0, (case[3], usage)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_covariance_bf16_gpu(backend):
    x, mask = _inputs(517, 131, torch.bfloat16, "bool", device="cuda")
    _check(backend, x, mask, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [37, 131], ids=["narrow", "wide"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_covariance_fp32_gpu(backend, d):
    """fp32 rows at the tiles this device takes (measured ones included): the narrow case's measured 16-bit tile
    once asked fp32 for more shared memory than an H100 has."""
    x, mask = _inputs(5000, d, torch.float32, "float", device="cuda")
    _check(backend, x, mask, torch.float32)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_covariance_index_space_above_2_31_gpu(backend):
    """R·D > 2^31 elements: row offsets must be int64."""
    r, d = (1 << 22) + 17, 520
    x = torch.empty(r, d, dtype=torch.float16, device="cuda").uniform_(-1, 1)
    require(backend, "covariance", {"x": x})
    got = ops.covariance(x, backend=backend)
    want = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    for start in range(0, r, 1 << 20):
        xs = x[start:start + (1 << 20)].double()
        want += xs.T @ xs
    # The rule for low precision: error ≤ 2 × the error of the same-precision torch computation
    # (fp16 rows, fp32 accumulation: the torch backend) + one fp32 unit roundoff at the output's scale.
    # The first H200 run (2026-11-26) failed the fixed 1e-4 bound it had then: the Triton kernel's
    # single tensor-core accumulator over ~700k rows per split came out 0.4 % low on the diagonal.
    torch_err = float((ops.covariance(x, backend="torch").double() - want).abs().max())
    scale = float(want.abs().max())
    assert_close_report(got, want, atol=2 * torch_err + 2**-23 * scale, rtol=0.0, name="covariance R*D > 2^31")


@pytest.mark.interpreter
@pytest.mark.parametrize("with_out", [False, True])
def test_covariance_triton_fp32_mask_weighted_in_chunks(monkeypatch, with_out):
    """fp32 with a mask: the launcher weights the rows itself, in chunks (forced down to 40 rows), each chunk
    added as out ← sym(out) + C; rows 37 wide are padded to 48 and the padding cut off. Same result as one
    chunk, and as the oracle."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common
    from source_fast.kernels.covariance import covariance_triton

    x, mask = _inputs(203, 37, torch.float32, "float")
    start = torch.randn(37, 37)
    whole = covariance_triton(x, mask, start.clone() if with_out else None)
    monkeypatch.setattr(_common, "chunk_examples", lambda n, per_example: 40)
    got = covariance_triton(x, mask, start.clone() if with_out else None)
    want = reference.covariance_ref(x, mask) + ((start + start.T) * 0.5 if with_out else 0)
    assert_matches_oracle(got, want, op="covariance", backend="triton", dtype=torch.float32)
    assert_matches_oracle(whole, want, op="covariance", backend="triton", dtype=torch.float32)
    assert torch.equal(got, got.T) and got.shape == (37, 37)
