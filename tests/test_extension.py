"""The compiled module source_fast._C: build checks and its entry points against the float64 oracles.

(a) nvcc compile check of every csrc/**/*.cu for sm_80 and sm_90 (no GPU needed; skipped without nvcc).
(b) the C++/OpenMP entry points (`source_fast._extension.<op>_cpu`) vs source_fast.reference on odd
    shapes, column-major eigenvectors, strided inputs, accumulation into `out`, bitwise equality across
    thread counts, and the module's structural error messages (skipped when `_C` is not built).
(c) ctest: configure + build the host C++ test of the CPU kernels with CMake under tmp_path and run it.
(d) `gpu`: the CUDA entry points vs the oracle for fp32/fp16/bf16 and 50-run bitwise determinism.

Build the module with `pip install --no-build-isolation -e .` (see setup.py for the switches).
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from source_fast import reference, spectral

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))


def _module():
    try:
        return importlib.import_module("source_fast._C")
    except ImportError as exc:
        pytest.skip(f"source_fast._C is not built ({exc}); pip install --no-build-isolation -e .")


def _ext():
    _module()
    return importlib.import_module("source_fast._extension")


def _assert_close(got, want, rel=2e-5, name=""):
    """max |got − want| ≤ rel · max |want| (fp32 kernels vs the float64 oracle), finite, same shape."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64 = got.detach().double().cpu()
    want64 = want.detach().double().cpu()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values"
    err = (got64 - want64).abs().max().item() if want64.numel() else 0.0
    scale = want64.abs().max().item() if want64.numel() else 0.0
    assert err <= rel * scale + 1e-30, f"{name}: max error {err:.3g} > {rel} x scale {scale:.3g}"


def _eigvecs(n, dtype=torch.float32):
    """Column-major orthogonal matrices, as torch.linalg.eigh returns them (strides (1, n))."""
    m = torch.randn(n, n, dtype=torch.float64)
    q = torch.linalg.eigh(m @ m.T + torch.eye(n, dtype=torch.float64))[1]
    q = q.to(dtype)
    assert n == 1 or q.stride() == (1, n), q.stride()
    return q


# ------------------------------------------------------------------------------------------- (a)


def _nvcc():
    return os.environ.get("CUDACXX") if os.environ.get("CUDACXX") else shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.parametrize("cu", CU_FILES, ids=[str(p.relative_to(ROOT / "csrc")) for p in CU_FILES])
def test_nvcc_compiles(cu, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDACXX or put nvcc on PATH)")
    # sm_80 and sm_90 in one invocation (one host pass): same check as two `-arch=sm_XX` runs.
    cmd = [nvcc, "-c", "-std=c++17", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-O3", "-Xcompiler", "-Wall", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", str(cu),
           "-o", str(tmp_path / f"{cu.stem}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    assert "warning" not in proc.stderr.lower(), f"nvcc warnings for {cu.name}:\n{proc.stderr[-6000:]}"


@pytest.mark.slow
def test_score_pairwise_cuda_tensor_core_build(tmp_path):
    """The 16-bit score_pairwise CUDA kernel runs on the tensor cores: its sm_80 and sm_90 builds hold HMMA
    instructions (WMMA 16 x 16 x 16) and no local memory (spills), for fp16 and bf16; the fp32 kernel has none.
    Read with the cuobjdump Triton's wheel bundles (no GPU needed)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDACXX or put nvcc on PATH)")
    triton = pytest.importorskip("triton")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this triton wheel bundles no cuobjdump")
    obj = tmp_path / "score_pairwise.o"
    cmd = [nvcc, "-c", "-std=c++17", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-O3", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}",
           str(ROOT / "csrc" / "score_pairwise" / "score_pairwise.cu"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    usage = subprocess.run([str(cuobjdump), "-res-usage", str(obj)], capture_output=True, text=True).stdout
    sass = subprocess.run([str(cuobjdump), "-sass", str(obj)], capture_output=True, text=True).stdout
    hmma, arch, kernel = {}, None, None
    for line in sass.splitlines():
        if "code for sm_" in line:
            arch = line.split("code for ")[1].split()[0]
        elif "Function :" in line:
            kernel = line.split("Function :")[1].strip()
        elif "HMMA" in line and kernel:
            hmma[(arch, kernel)] = hmma.get((arch, kernel), 0) + 1
    for dtype in ("6__half", "13__nv_bfloat16"):
        for sm in ("sm_80", "sm_90"):
            found = [n for (a, k), n in hmma.items() if a == sm and "pairwise_tc_kernel" in k and dtype in k]
            assert found and found[0] > 0, (sm, dtype, sorted(hmma))
    assert not [k for (_, k) in hmma if "pairwise_kernel" in k], "the SIMT kernel should have no HMMA"
    lines = usage.splitlines()
    tc_usage = [lines[j + 1] for j, line in enumerate(lines) if "pairwise_tc_kernel" in line]
    assert len(tc_usage) == 4 and all("LOCAL:0" in u and "STACK:0" in u for u in tc_usage), tc_usage


def test_every_op_has_cuda_and_header():
    for op in ("covariance", "lambda_accum", "kron_project", "score_pairwise", "score_self", "score_lowrank",
               "score_per_token"):
        assert (ROOT / "csrc" / op / f"{op}.cu").exists(), op
        assert (ROOT / "csrc" / op / f"{op}.h").exists(), op


# ------------------------------------------------------------------------------------------- (b)

COV_SHAPES = [(1, 1), (7, 13), (300, 61), (1000, 129), (257, 33)]


@pytest.mark.parametrize("r,d", COV_SHAPES, ids=[f"R{r}-D{d}" for r, d in COV_SHAPES])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_cpu_covariance(r, d, mask_kind):
    ext = _ext()
    x = torch.randn(r, d)
    mask = None if mask_kind == "none" else (torch.rand(r) > 0.3 if mask_kind == "bool" else torch.rand(r) * 2)
    got = ext.covariance_cpu(x, mask)
    assert got.dtype == torch.float32
    _assert_close(got, reference.covariance_ref(x, mask), name="covariance")
    assert torch.equal(got, got.T), "covariance must be exactly symmetric"


def test_cpu_covariance_strided_and_out():
    ext = _ext()
    x = torch.randn(95, 70).T.contiguous().T  # column-major x
    base = torch.randn(70, 70)
    want = (base.double() + base.double().T) / 2 + reference.covariance_ref(x)
    out = base.clone()
    ret = ext.covariance_cpu(x, None, out)
    assert ret is out
    _assert_close(out, want, name="covariance out")
    out_t = base.clone().T  # non-row-major out: computed aside, then added
    ext.covariance_cpu(x, None, out_t)
    _assert_close(out_t, (base.double().T + base.double()) / 2 + reference.covariance_ref(x), name="covariance out.T")
    out64 = base.double().clone()
    ext.covariance_cpu(x, None, out64)
    _assert_close(out64, want, name="covariance fp64 out")


TOKEN_SHAPES = [(1, 1, 1, 1), (5, 1, 37, 13), (11, 3, 70, 29), (40, 9, 33, 65), (300, 1, 20, 45), (64, 16, 41, 23)]
TOKEN_IDS = [f"N{n}-T{t}-I{i}-O{o}" for n, t, i, o in TOKEN_SHAPES]


@pytest.mark.parametrize("n,t,i,o", TOKEN_SHAPES, ids=TOKEN_IDS)
def test_cpu_lambda_accum(n, t, i, o):
    ext = _ext()
    a, g = torch.randn(n, t, i), torch.randn(n, t, o)
    q_a, q_s = _eigvecs(i), _eigvecs(o)
    want = reference.lambda_accum_ref(a, g, q_a, q_s)
    _assert_close(ext.lambda_accum_cpu(a, g, q_a, q_s), want, name="lambda_accum")
    out = torch.rand(o, i)
    want_out = out.double() + want
    ext.lambda_accum_cpu(a, g, q_a, q_s, out)
    _assert_close(out, want_out, name="lambda_accum out")
    # Strided (non-contiguous) tokens.
    a_nc = torch.randn(i, t, n).permute(2, 1, 0)
    a_nc.copy_(a)
    _assert_close(ext.lambda_accum_cpu(a_nc, g, q_a, q_s), want, name="lambda_accum strided a")


@pytest.mark.parametrize("n,t,i,o", TOKEN_SHAPES, ids=TOKEN_IDS)
def test_cpu_score_self(n, t, i, o):
    ext = _ext()
    a, g = torch.randn(n, t, i), torch.randn(n, t, o)
    q_a, q_s = _eigvecs(i), _eigvecs(o)
    w = torch.rand(i, o).T  # strided weights
    got = ext.score_self_cpu(a, g, q_s, q_a, w)
    _assert_close(got, reference.score_self_ref(a, g, q_s, q_a, w), name="score_self")


PAIR_SHAPES = [(1, 1, 1, 1, 1), (3, 17, 1, 37, 13), (5, 70, 2, 65, 7), (2, 9, 3, 11, 30), (7, 40, 1, 130, 50),
               (33, 20, 6, 12, 10)]  # the last one is the "materialize" regime (delegated to BLAS)


@pytest.mark.parametrize("q,n,t,i,o", PAIR_SHAPES, ids=[f"Q{q}-N{n}-T{t}-I{i}-O{o}" for q, n, t, i, o in PAIR_SHAPES])
def test_cpu_score_pairwise(q, n, t, i, o):
    ext = _ext()
    v, a, g = torch.randn(q, o, i), torch.randn(n, t, i), torch.randn(n, t, o)
    want = reference.score_pairwise_ref(v, a, g)
    _assert_close(ext.score_pairwise_cpu(v, a, g), want, name="score_pairwise")
    v_nc = torch.randn(i, o, q).permute(2, 1, 0)
    v_nc.copy_(v)
    _assert_close(ext.score_pairwise_cpu(v_nc, a, g), want, name="score_pairwise strided v")


FNS = [spectral.identity(), spectral.inverse(0.3), spectral.propagation(0.7), spectral.propagation(0.7, damping=0.2),
       spectral.Spectral("discrete_s", eta=0.01, steps=30, damping=0.5), spectral.accumulation(0.7),
       spectral.accumulation(2.0, damping=0.1), spectral.Spectral("discrete_s", eta=0.01, steps=30),
       spectral.Spectral("discrete_r", eta=0.01, steps=30), spectral.Spectral("discrete_r", eta=3.0, steps=3)]


def test_cpu_kron_project_column_major():
    ext = _ext()
    q, o, i = 3, 13, 41
    v, lam = torch.randn(q, o, i), torch.rand(o, i) * 3
    q_s, q_a = _eigvecs(o), _eigvecs(i)
    got = ext.kron_project_cpu(v, q_s, q_a, lam, FNS)
    want = reference.kron_project_ref(v, q_s, q_a, lam, FNS)
    for f, x, y in zip(FNS, got, want):
        _assert_close(x, y, rel=5e-5, name=f"kron_project {f}")


def test_spectral_eval_matches_float64():
    """The fp32 spectral_eval the CUDA epilogue runs, on the host, vs spectral.evaluate in float64."""
    ext = _ext()
    sigma = torch.cat([torch.zeros(1), torch.logspace(-12, 4, 400), torch.tensor([-1e-7, 0.5, 1.0])]).float()
    for f in FNS + [spectral.accumulation(0.0), spectral.Spectral("discrete_s", eta=0.5, steps=0)]:
        got = ext.spectral_weights_cpu(f, sigma)
        want = spectral.evaluate(f, sigma.double())
        err = ((got.double() - want).abs() / want.abs().clamp_min(1e-30)).where(want != 0, got.double().abs())
        if f.kind == "discrete_s" and f.eta * f.steps > 1:
            continue
        big = sigma.double() * f.eta < 0.99 if f.kind.startswith("discrete") else torch.ones_like(want, dtype=torch.bool)
        assert (err[big] <= 2e-5).all(), f"{f}: max rel err {err[big].max():.3g}"


def test_cpu_bitwise_across_threads():
    ext = _ext()
    a, g = torch.randn(70, 5, 90), torch.randn(70, 5, 40)
    q_a, q_s = _eigvecs(90), _eigvecs(40)
    x = torch.randn(600, 100)
    v = torch.randn(4, 40, 90)
    w = torch.rand(40, 90)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((ext.covariance_cpu(x), ext.lambda_accum_cpu(a, g, q_a, q_s),
                            ext.score_self_cpu(a, g, q_s, q_a, w), ext.score_pairwise_cpu(v, a[:, :1], g[:, :1])))
    finally:
        torch.set_num_threads(saved)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_cpu_dispatch_selects_extension():
    _ext()
    from source_fast import _dispatch, ops

    x = torch.randn(64, 41)  # wider than the narrow factors the automatic choice leaves to torch
    name, _ = _dispatch.select("covariance", {"x": x})
    if "covariance" in _dispatch.BACKENDS["cpu"].ops:
        assert name == "cpu"
    _assert_close(ops.covariance(x, backend="cpu"), reference.covariance_ref(x), name="ops.covariance[cpu]")


def test_module_structural_errors():
    C = _module()
    x = torch.randn(4, 3)
    out = torch.empty(3, 3)
    with pytest.raises(ValueError, match=r"x: expected dtype in \{float32\}, got float16"):
        C.covariance_cpu(x.data_ptr(), 4, 3, 3, 1, C.DTYPE_FLOAT16, 0, 0, 0, out.data_ptr(), 3, 0, False, 1)
    with pytest.raises(ValueError, match=r"x: expected stride\(1\) >= 0, got -1"):
        C.covariance_cpu(x.data_ptr(), 4, 3, 3, -1, 0, 0, 0, 0, out.data_ptr(), 3, 0, False, 1)
    with pytest.raises(ValueError, match=r"out: expected leading dimension >= 3, got 2"):
        C.covariance_cpu(x.data_ptr(), 4, 3, 3, 1, 0, 0, 0, 0, out.data_ptr(), 2, 0, False, 1)
    with pytest.raises(ValueError, match=r"x: expected a non-null data pointer"):
        C.covariance_cpu(0, 4, 3, 3, 1, 0, 0, 0, 0, out.data_ptr(), 3, 0, False, 1)
    with pytest.raises(ValueError, match=r"num_threads: expected >= 1, got 0"):
        C.covariance_cpu(x.data_ptr(), 4, 3, 3, 1, 0, 0, 0, 0, out.data_ptr(), 3, 0, False, 0)
    with pytest.raises(ValueError, match=r"fns\[0\]: inverse needs damping > 0"):
        C.spectral_eval_cpu((1, 0.0, 0.0, 0.0, 0), x.data_ptr(), 1, 1, 0, out.data_ptr(), 0)
    if not C.HAS_CUDA:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            C.covariance_cuda(x.data_ptr(), 4, 3, 3, 1, 0, 0, 0, 0, out.data_ptr(), 3, 0, False, 0, 0, 0)


def test_import_without_extension(tmp_path):
    """With `_C` unimportable, `import source_fast` and every op on the torch backend still work, and
    the cpu backend explains how to rebuild."""
    script = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "source_fast._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, source_fast
        from source_fast import ops, _dispatch
        x = torch.randn(9, 4)
        assert torch.allclose(ops.covariance(x), x.T @ x, atol=1e-5)
        reason = _dispatch.BACKENDS["cpu"].availability()
        assert "pip install --no-build-isolation -e ." in reason, reason
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------- (c)


def _cmake():
    try:
        import cmake  # noqa: PLC0415

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except Exception:
        pass
    return shutil.which("cmake")


@pytest.mark.slow
def test_ctest_cpu_kernels(tmp_path):
    cmake = _cmake()
    if cmake is None:
        pytest.skip("cmake not found")
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler found")
    build = tmp_path / "build"
    args = [cmake, "-S", str(ROOT), "-B", str(build), "-DSOURCE_FAST_BUILD_MODULE=OFF", "-DSOURCE_FAST_WITH_CUDA=OFF",
            "-DCMAKE_BUILD_TYPE=Release"]
    try:
        import ninja  # noqa: PLC0415

        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
    except Exception:
        pass
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "No CMAKE_CXX_COMPILER could be found" in proc.stderr:
        pytest.skip("CMake found no working C++ compiler")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 1)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    ctest = str(Path(cmake).with_name("ctest")) if Path(cmake).with_name("ctest").exists() else shutil.which("ctest")
    proc = subprocess.run([ctest, "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True,
                          timeout=300, cwd=str(build))
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------- (d)


def _cuda_ext():
    C = _module()
    if not C.HAS_CUDA:
        pytest.skip("source_fast._C was built without CUDA")
    return importlib.import_module("source_fast._extension")


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_RTOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}  # inputs are upcast exactly


def _gpu(t, dtype=None):
    return t.to("cuda", dtype=dtype) if dtype is not None else t.to("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("r,d,masked", [(1, 1, False), (300, 61, True), (4133, 130, False), (700, 257, True)])
def test_cuda_covariance(dtype, r, d, masked):
    ext = _cuda_ext()
    x = _gpu(torch.randn(r, d), dtype)
    mask = _gpu(torch.rand(r)) if masked else None
    got = ext.covariance_cuda(x, mask)
    _assert_close(got, reference.covariance_ref(x, mask), rel=GPU_RTOL[dtype], name="covariance_cuda")
    out = _gpu(torch.randn(d, d))
    want = (out.double() + out.double().T) / 2 + reference.covariance_ref(x, mask)
    ext.covariance_cuda(x, mask, out)
    _assert_close(out, want, rel=GPU_RTOL[dtype], name="covariance_cuda out")


GPU_TOKENS = [(1, 1, 1, 1), (37, 1, 130, 70), (19, 7, 65, 33), (300, 3, 257, 129), (5, 40, 31, 17)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("n,t,i,o", GPU_TOKENS)
def test_cuda_lambda_accum_and_score_self(dtype, n, t, i, o):
    ext = _cuda_ext()
    a, g = _gpu(torch.randn(n, t, i), dtype), _gpu(torch.randn(n, t, o), dtype)
    q_a, q_s = _gpu(_eigvecs(i)), _gpu(_eigvecs(o))  # column-major, fp32
    w = _gpu(torch.rand(o, i))
    _assert_close(ext.lambda_accum_cuda(a, g, q_a, q_s), reference.lambda_accum_ref(a, g, q_a, q_s),
                  rel=GPU_RTOL[dtype], name="lambda_accum_cuda")
    out = _gpu(torch.rand(o, i))
    want = out.double() + reference.lambda_accum_ref(a, g, q_a, q_s)
    ext.lambda_accum_cuda(a, g, q_a, q_s, out)
    _assert_close(out, want, rel=GPU_RTOL[dtype], name="lambda_accum_cuda out")
    _assert_close(ext.score_self_cuda(a, g, q_s, q_a, w), reference.score_self_ref(a, g, q_s, q_a, w),
                  rel=GPU_RTOL[dtype], name="score_self_cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("q,n,t,i,o", [(1, 1, 1, 1, 1), (3, 70, 1, 65, 13), (70, 130, 2, 33, 20), (5, 9, 4, 129, 66)])
def test_cuda_score_pairwise(dtype, q, n, t, i, o):
    ext = _cuda_ext()
    v, a, g = _gpu(torch.randn(q, o, i), dtype), _gpu(torch.randn(n, t, i), dtype), _gpu(torch.randn(n, t, o), dtype)
    _assert_close(ext.score_pairwise_cuda(v, a, g), reference.score_pairwise_ref(v, a, g), rel=GPU_RTOL[dtype],
                  name="score_pairwise_cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("q,o,i", [(1, 1, 1), (3, 13, 41), (2, 70, 130)])
def test_cuda_kron_project(dtype, q, o, i):
    ext = _cuda_ext()
    v = _gpu(torch.randn(q, o, i), dtype)
    q_s, q_a, lam = _gpu(_eigvecs(o)), _gpu(_eigvecs(i)), _gpu(torch.rand(o, i) * 3)
    got = ext.kron_project_cuda(v, q_s, q_a, lam, FNS)
    want = reference.kron_project_ref(v, q_s, q_a, lam, FNS)
    for f, x, y in zip(FNS, got, want):
        _assert_close(x, y, rel=5e-5, name=f"kron_project_cuda {f}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_bitwise_determinism_50_runs(dtype):
    ext = _cuda_ext()
    n, t, i, o, q = 200, 3, 130, 70, 9
    a, g = _gpu(torch.randn(n, t, i), dtype), _gpu(torch.randn(n, t, o), dtype)
    v = _gpu(torch.randn(q, o, i), dtype)
    q_a, q_s, w = _gpu(_eigvecs(i)), _gpu(_eigvecs(o)), _gpu(torch.rand(o, i))
    x = a.reshape(-1, i)
    fns = (spectral.accumulation(0.7), spectral.propagation(0.7))

    def run():
        return (ext.covariance_cuda(x), ext.lambda_accum_cuda(a, g, q_a, q_s), ext.score_self_cuda(a, g, q_s, q_a, w),
                ext.score_pairwise_cuda(v, a, g), *ext.kron_project_cuda(v, q_s, q_a, w, fns))

    first = run()
    for _ in range(49):
        for x1, x2 in zip(first, run()):
            assert torch.equal(x1, x2)


@pytest.mark.gpu
def test_cuda_through_dispatch():
    _cuda_ext()
    from source_fast import ops

    x = _gpu(torch.randn(100, 30), torch.float16)
    _assert_close(ops.covariance(x, backend="cuda"), reference.covariance_ref(x), name="ops.covariance[cuda]")
