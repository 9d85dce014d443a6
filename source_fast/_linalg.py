"""Dense products of the pipeline (basis rotations, the rotated walk): torch.matmul, or on CPU the
compiled AVX-512 GEMM (csrc/gemm) where it runs: fp32 CPU tensors of 2 or 3 dims and enough work.

Why: the MKL in torch's CPU wheels takes its AVX2 path on AMD CPUs; csrc/gemm runs about 2x faster
there (benchmarks/bench_gemm.py). Results differ from torch.matmul only by fp32 summation order. The
first use checks the kernel against a float64 product; a mismatch disables it with a warning (`_compiled`).
"""
from __future__ import annotations

import torch

from . import _compiled

_MIN_FLOPS = 4.0e6   # below this a parallel region and packing cost more than they save
_MIN_COLUMNS = 16    # the micro-kernel pads columns to whole 32-wide panels


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
