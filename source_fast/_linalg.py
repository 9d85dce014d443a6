"""Dense linear algebra of the pipeline outside the ops: products (basis rotations, the rotated walk) and the
float64 eigendecompositions of the covariance factors.

`matmul`: torch.matmul, or on CPU the compiled AVX-512 GEMM (csrc/gemm) where it runs: fp32 CPU tensors of 2 or
3 dims and enough work. Why: the MKL in torch's CPU wheels takes its AVX2 path on AMD CPUs; csrc/gemm runs about
2x faster there (benchmarks/bench_gemm.py). Results differ from torch.matmul only by fp32 summation order. The
first use checks the kernel against a float64 product; a mismatch disables it with a warning (`_compiled`).

`eigh`: torch.linalg.eigh, or on CPU numpy's LAPACK (the OpenBLAS bundled with numpy's wheels) where torch's is
MKL on a non-Intel CPU. Why: MKL's symmetric eigensolver takes its generic paths there; numpy's dsyevd (the same
divide-and-conquer driver) ran 1.03-1.5x faster on the Zen 4 host from n = 257 on, the more the larger n
(benchmarks/bench_eigh.py; 0.91-1.03x at n = 129, so smaller factors stay with torch). The
results differ by float64 round-off (eigenvectors of repeated eigenvalues may be any basis of their space, as with
any LAPACK). SOURCE_FAST_EIGH_LAPACK=torch|numpy overrides the choice.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import platform
from pathlib import Path

import numpy as np
import torch

from . import _compiled, _config

log = logging.getLogger("source_fast")

_MIN_FLOPS = 4.0e6   # below this a parallel region and packing cost more than they save
_MIN_COLUMNS = 16    # the micro-kernel pads columns to whole 32-wide panels
_NUMPY_EIGH_MIN_SIZE = 200  # numpy's LAPACK was 0.91x torch's at n = 129 (2 threads), 1.03-1.5x from 257 on


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for 2-D/3-D operands (3-D @ 3-D needs equal batch sizes); torch.matmul semantics.
    `out`: a tensor of the result's shape and dtype (not overlapping a or b), written and returned."""
    if _compiled_ok(a, b) and (out is None or out.dtype == torch.float32):
        from . import _extension

        return _extension.gemm_cpu(a, b, out=out)
    if out is None:
        return torch.matmul(a, b)
    return torch.matmul(a, b, out=out)


def _compiled_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dim() not in (2, 3) or b.dim() not in (2, 3) or (a.dim() == 3 and b.dim() == 3 and a.shape[0] != b.shape[0]):
        return False
    batch = a.shape[0] if a.dim() == 3 else (b.shape[0] if b.dim() == 3 else 1)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    columns = m if (a.dim() == 2 and b.dim() == 3) else n  # that case runs transposed (see gemm_cpu)
    if 2.0 * batch * m * k * n < _MIN_FLOPS or columns < _MIN_COLUMNS:
        return False
    return _compiled.usable("GEMM", _check, a, b)


def _check() -> bool:
    from . import _extension

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 29, 41, generator=gen)
    b = torch.randn(41, 37, generator=gen)
    l = torch.randn(23, 29, generator=gen)
    for got, want in [(_extension.gemm_cpu(a, b), a.double() @ b.double()),
                      (_extension.gemm_cpu(l, a), l.double() @ a.double())]:
        if not torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item()):
            return False
    return True


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending, eigenvectors as columns) of a symmetric matrix from its lower triangle, as
    torch.linalg.eigh returns them (and raising its LinAlgError), by the LAPACK that `eigh_lapack` picks."""
    lapack, why = eigh_lapack(matrix)
    if lapack == "torch":
        return torch.linalg.eigh(matrix)
    _log_once(f"source_fast: float64 eigendecompositions in numpy's LAPACK ({why})")
    with _blas_threads(torch.get_num_threads()):  # numpy's OpenBLAS would otherwise take every core
        try:
            evals, evecs = np.linalg.eigh(matrix.numpy(), UPLO="L")
        except np.linalg.LinAlgError as exc:
            raise torch.linalg.LinAlgError(f"numpy's LAPACK: {exc}") from exc
    return torch.from_numpy(evals), torch.from_numpy(evecs)


def eigh_lapack(matrix: torch.Tensor) -> tuple[str, str]:
    """("torch" or "numpy", why) for `eigh` of this matrix."""
    if matrix.device.type != "cpu" or matrix.dtype != torch.float64 or matrix.requires_grad:
        return "torch", "not a float64 CPU tensor without autograd"
    wanted = _config.eigh_lapack()
    if wanted != "auto":
        return wanted, f"SOURCE_FAST_EIGH_LAPACK={wanted}"
    if matrix.shape[-1] < _NUMPY_EIGH_MIN_SIZE:
        return "torch", f"n = {matrix.shape[-1]} < {_NUMPY_EIGH_MIN_SIZE}: no faster elsewhere"
    if not torch.backends.mkl.is_available():
        return "torch", "torch's LAPACK is not MKL"
    vendor = cpu_vendor()
    if vendor in ("GenuineIntel", ""):
        return "torch", "MKL on an Intel CPU" if vendor else "MKL, and the CPU's vendor is unknown"
    numpy_lapack = _numpy_lapack()
    if "openblas" not in numpy_lapack.lower():
        return "torch", f"numpy's LAPACK is {numpy_lapack or 'unknown'}, not OpenBLAS"
    return "numpy", (f"torch's LAPACK is MKL on this {vendor} CPU: numpy's {numpy_lapack} runs faster there from "
                     f"{_NUMPY_EIGH_MIN_SIZE} rows on")


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...), or "" where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    described = platform.processor()  # Windows: "... GenuineIntel" / "... AuthenticAMD"
    return next((v for v in ("GenuineIntel", "AuthenticAMD", "HygonGenuine") if v in described), "")


@functools.lru_cache(maxsize=None)
def _numpy_lapack() -> str:
    try:
        return str(np.show_config(mode="dicts")["Build Dependencies"]["lapack"]["name"])
    except Exception:  # numpy < 1.26 has no dict form: not known, so torch's LAPACK is kept
        return ""


@functools.lru_cache(maxsize=None)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")  # created once: it scans the loaded libraries (~3 ms)


def _blas_threads(count: int):
    controller = _blas_controller()
    return controller.limit(limits=count) if controller.lib_controllers else contextlib.nullcontext()
