"""kron_project: every available backend against the float64 reference (source_fast/reference/kron_project.py)."""
import pytest
import torch

from _backends import (BMM_SIGNATURE, assert_fast_sm90_builds, backend_params, bmm_cases, compile_for_gpu,
                       eigh_basis, require)
from _tolerances import assert_matches_oracle
from source_fast import ops, reference, spectral

BACKENDS = backend_params("cpu")
GPU_BACKENDS = backend_params("cuda")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
SHAPES = [  # (Q, I, O)
    pytest.param(1, 1, 1, id="q1-i1-o1"),
    pytest.param(3, 41, 13, id="q3-i41-o13"),
    pytest.param(2, 13, 41, id="q2-i13-o41"),
    pytest.param(2, 80, 20, id="q2-i80-o20"),
]
# Every continuous kind, with the edge cases of SOURCE_MATH.md §5 / STYLE.md §6.3 (c = 0, huge c,
# damping). The discrete (exact-unrolling) kinds are tested in their stable range below.
FNS = (
    spectral.identity(),
    spectral.inverse(0.1),
    spectral.propagation(0.7),
    spectral.propagation(3.0, damping=0.05),  # weight decay shifts s too
    spectral.accumulation(0.7),
    spectral.accumulation(3.0, damping=0.05),
    spectral.accumulation(1e6),
    spectral.accumulation(0.0),
)
FN_IDS = ["identity", "inverse", "exp", "exp-damped", "source_r", "source_r-damped", "source_r-c1e6", "source_r-c0"]
DISCRETE = [
    pytest.param(spectral.Spectral("discrete_s", eta=0.5, steps=9), id="discrete_s"),
    pytest.param(spectral.Spectral("discrete_r", eta=0.5, steps=9), id="discrete_r"),
    pytest.param(spectral.Spectral("discrete_s", eta=0.5, steps=9, damping=0.1), id="discrete_s-damped"),
    pytest.param(spectral.Spectral("discrete_r", eta=0.5, steps=9, damping=0.1), id="discrete_r-damped"),
]
def _lam(o, i, device="cpu"):
    """Eigenvalues over 12 decades, with an exact 0 and a round-off negative (clamped to 0)."""
    lam = torch.logspace(-9, 3, o * i, device=device)[torch.randperm(o * i, device=device)].reshape(o, i)
    lam.view(-1)[0] = 0.0
    if lam.numel() > 1:
        lam.view(-1)[-1] = -1e-7
    return lam


def _inputs(q, i, o, dtype, device="cpu"):
    v = torch.randn(q, o, i, device=device).to(dtype)
    return v, eigh_basis(o, device), eigh_basis(i, device), _lam(o, i, device)


def _tensors(v, q_s, q_a, lam):
    return {"v": v, "q_s": q_s, "q_a": q_a, "lam": lam}


def _check(backend, v, q_s, q_a, lam, fns, dtype):
    require(backend, "kron_project", _tensors(v, q_s, q_a, lam))
    got = ops.kron_project(v, q_s, q_a, lam, fns, backend=backend)
    oracles = reference.kron_project_ref(v, q_s, q_a, lam, fns)
    baselines = reference.kron_project_ref(v, q_s, q_a, lam, fns, upcast=False) \
        if dtype in (torch.float16, torch.bfloat16) else [None] * len(fns)
    assert isinstance(got, tuple) and len(got) == len(fns)
    for f, out, oracle, base in zip(fns, got, oracles, baselines):
        assert out.shape == v.shape and out.dtype == torch.float32
        assert_matches_oracle(out, oracle, op="kron_project", backend=backend, dtype=dtype, baseline=base,
                              name=f"kron_project[{backend}, {dtype}, {f.kind} c={f.c} δ={f.damping}]")
    return got


# The fp16 rule needs a finite fp16 baseline: c = 1e6 makes r(0) = 1e6 > fp16 max (65504).
FNS_FP16 = tuple(f for f in FNS if f.c < 1e4)


@pytest.mark.parametrize("q,i,o", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_project_matches_oracle(backend, dtype, q, i, o):
    _check(backend, *_inputs(q, i, o, dtype), FNS if dtype == torch.float32 else FNS_FP16, dtype)


@pytest.mark.parametrize("fn", FNS, ids=FN_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_project_single_function(backend, fn):
    """A bare Spectral (not a sequence) returns one tensor."""
    v, q_s, q_a, lam = _inputs(2, 41, 13, torch.float32)
    require(backend, "kron_project", _tensors(v, q_s, q_a, lam))
    got = ops.kron_project(v, q_s, q_a, lam, fn, backend=backend)
    assert isinstance(got, torch.Tensor)
    assert_matches_oracle(got, reference.kron_project_ref(v, q_s, q_a, lam, (fn,))[0], op="kron_project",
                          backend=backend, dtype=torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # c·σ → inf in the interpreter's numpy
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_project_extreme_eigenvalues(backend):
    """Huge Λ (exp underflows to 0, r → 1/σ), Λ = 0 (r = c, s = 1), tiny Λ, huge c: no NaN/Inf."""
    o, i = 5, 7
    v, q_s, q_a, _ = _inputs(2, i, o, torch.float32)
    lam = torch.tensor([0.0, 1e-30, 1e-12, 1e-6, 0.3, 1.0, 1e4, 1e12, 3e38, -1e-20] * 4)[: o * i].reshape(o, i)
    fns = (spectral.propagation(5.0), spectral.accumulation(5.0), spectral.accumulation(1e30),
           spectral.inverse(1e-3))
    got = _check(backend, v, q_s, q_a, lam, fns, torch.float32)
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("fn", DISCRETE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_project_discrete_forms(request, backend, fn):
    """(1 − ησ)^K and (1 − (1 − ησ)^K)/σ over the stable range 0 ≤ ησ < 2, σ over 10 decades
    (with σ = 0: limits 1 and ηK)."""
    o, i = 13, 41
    v, q_s, q_a, _ = _inputs(2, i, o, torch.float32)
    lam = (torch.logspace(-10, 0, o * i)[torch.randperm(o * i)] * (1.9 / fn.eta)).reshape(o, i)
    lam.view(-1)[0] = 0.0
    _check(backend, v, q_s, q_a, lam, (fn,), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_project_noncontiguous_eigenvectors(backend):
    v, q_s, q_a, lam = _inputs(3, 41, 13, torch.float32)
    assert not q_a.is_contiguous() and not q_s.is_contiguous()
    got = _check(backend, v, q_s, q_a, lam, FNS[:4], torch.float32)
    dense = ops.kron_project(v, q_s.contiguous(), q_a.contiguous(), lam, FNS[:4], backend=backend)
    for x, y in zip(got, dense):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6 * float(y.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_project_deterministic(backend):
    v, q_s, q_a, lam = _inputs(3, 80, 20, torch.float32)
    require(backend, "kron_project", _tensors(v, q_s, q_a, lam))
    runs = [ops.kron_project(v, q_s, q_a, lam, FNS[:4], backend=backend, deterministic=True) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], other))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_project_fills_uninitialized_output(backend):
    v, q_s, q_a, lam = _inputs(3, 80, 20, torch.float32)
    require(backend, "kron_project", _tensors(v, q_s, q_a, lam))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty → NaN-filled
    try:
        got = ops.kron_project(v, q_s, q_a, lam, FNS[:4], backend=backend)
    finally:
        torch.use_deterministic_algorithms(previous)
    for out, oracle in zip(got, reference.kron_project_ref(v, q_s, q_a, lam, FNS[:4])):
        assert torch.isfinite(out).all()
        assert_matches_oracle(out, oracle, op="kron_project", backend=backend, dtype=torch.float32)


@pytest.mark.interpreter
def test_kron_project_triton_spectral_epilogue_matches_spectral_evaluate():
    """The on-chip f(σ) of kernels/_common.py against spectral.evaluate in float64, σ over 40 decades:
    the series/expm1 switch of source_r (x = cσ near 0.5) and the limits."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common

    sigma = torch.cat([torch.zeros(1), torch.logspace(-20, 20, 1001), torch.linspace(0.4, 0.6, 101) / 0.7])
    for spec in (spectral.inverse(1e-3), spectral.propagation(0.7), spectral.propagation(0.7, damping=2.0),
                 spectral.accumulation(0.7),
                 spectral.accumulation(0.7, damping=1e-3), spectral.accumulation(1e6), spectral.accumulation(0.0)):
        out = torch.empty(1, 1, sigma.numel())
        _common.bmm(torch.ones(1, 1, 1), torch.ones(1, 1, sigma.numel()), out, fkind=_common.spectral_code(spec),
                    f=sigma[None], spec_c=spec.c, spec_damping=spec.damping)
        want = spectral.evaluate(spec, sigma.double())
        got = out[0, 0].double()
        # fp32: a few ulps, times the conditioning of exp(−x) at x = cσ (the fp32 rounding of cσ
        # alone moves exp(−x) by x·2^-24 relative); absolute below fp32's smallest normal.
        allowed = 1e-37 + 1e-6 * (1.0 + spec.c * sigma.double()) * want.abs()
        bad = ((got - want).abs() > allowed) | ~torch.isfinite(got)
        assert not bad.any(), (f"{spec}: {int(bad.sum())} bad values, first σ={sigma[bad][:3].tolist()}: "
                               f"got {got[bad][:3].tolist()} want {want[bad][:3].tolist()}")


@pytest.mark.interpreter
def test_bmm_rounds_fp32_operands_as_the_kernel_would():
    """`_common.bmm` rounds fp32 operands of a 16-bit dot before the kernel (so they stream as 16-bit rows): the
    same bits as the kernel's own rounding, which it still does for a scaled b (a table of ones here)."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _common

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 37, 45, generator=gen)
    b = torch.randn(2, 45, 29, generator=gen)
    rounded = _common.bmm(a, b, torch.empty(2, 37, 29), dot=_common.DOT_F16)
    in_kernel = _common.bmm(a.half(), b, torch.empty(2, 37, 29), dot=_common.DOT_F16, fkind=_common.F_TABLE,
                            f=torch.ones(45, 29))
    assert torch.equal(rounded, in_kernel)
    assert torch.equal(rounded, _common.bmm(a.half(), b.half(), torch.empty(2, 37, 29), dot=_common.DOT_F16))
    assert not torch.equal(rounded, _common.bmm(a, b, torch.empty(2, 37, 29)))  # fp32 dots differ: a real rounding


@pytest.mark.slow
def test_kron_project_kernels_compile_for_gpu():
    """Every epilogue builds; the GEMM's 16-bit, TF32 and 3xTF32 GPU tiles, with both operands 16-bit as
    `_common.bmm` passes them (fp32 for TF32 and 3xTF32) and the unit strides Triton's JIT specialises, build for
    sm_90 without spills, with asynchronous copies and wgmma."""
    from source_fast.kernels import _blocks

    compile_for_gpu(bmm_cases({0: "*fp32", 1: "*fp16"}, fkinds=(0, 1, 2, 3, 4)))
    fast = []
    # 3: TF32 (lambda_accum's one-token squares); 4: 3xTF32 (fp32 inputs where FP32_TENSOR_CORES turns it on)
    for dot, ptr in ((1, "*fp16"), (2, "*bf16"), (3, "*fp32"), (4, "*fp32")):
        bm, bn, bk, warps = _blocks.GEMM_GPU_BLOCKS[dot]
        sig = {k: v for k, v in BMM_SIGNATURE.items() if k not in ("stride_ak", "stride_bn", "stride_cn")}
        sig.update(a_ptr=ptr, b_ptr=ptr)
        const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT=dot, FKIND=0, SQUARE=False, ACCUMULATE=False,
                     stride_ak=1, stride_bn=1, stride_cn=1)
        fast.append(("source_fast.kernels._common", "_bmm_kernel", sig, const, 90,
                     {"num_warps": warps, "div16": ["a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_ab", "stride_am",
                                                    "stride_bk", "stride_cb", "stride_cm"]}))
    assert_fast_sm90_builds(fast)


@pytest.fixture
def fp32_on_tensor_cores(blocks_override):
    """_blocks.FP32_TENSOR_CORES on for both kernel families: fp32 GEMMs as 3xTF32 (DOT_F32X3)."""
    blocks_override({"FP32_TENSOR_CORES": {"gemm": [1], "per_token": [1]}})


@pytest.mark.interpreter
def test_kron_project_triton_fp32_as_3xtf32(fp32_on_tensor_cores, monkeypatch):
    """With FP32_TENSOR_CORES on, kron_project's fp32 GEMMs take the 3xTF32 dot (its tiles, its code) and still
    match the oracle at fp32's tolerance (the interpreter computes that dot in fp32; the GPU test below holds
    the tensor cores to the same tolerance)."""
    if "triton" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("triton is not available in this process")
    from source_fast.kernels import _blocks, _common

    dots = []
    real = _common.gemm_blocks
    monkeypatch.setattr(_common, "gemm_blocks", lambda m, n, k, dot: dots.append(dot) or real(m, n, k, dot))
    _check("triton", *_inputs(3, 37, 21, torch.float32), FNS[:2], torch.float32)
    assert dots and set(dots) == {_common.DOT_F32X3}
    assert _blocks.fp32_dot("gemm") == _common.DOT_F32X3
    _blocks.override_blocks(None)
    assert _blocks.fp32_dot("gemm") == _common.DOT_F32


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
def test_kron_project_fp32_as_3xtf32_gpu(fp32_on_tensor_cores, backend):
    """3xTF32 on the tensor cores keeps fp32's tolerance against the float64 oracle."""
    _check(backend, *_inputs(5, 131, 67, torch.float32, device="cuda"), FNS, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kron_project_bf16_gpu(backend):
    _check(backend, *_inputs(5, 131, 67, torch.bfloat16, device="cuda"), FNS, torch.bfloat16)
