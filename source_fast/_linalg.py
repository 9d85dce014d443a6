"""Dense products of the pipeline (basis rotations, the rotated walk): torch.matmul, or on CPU the
compiled AVX-512 GEMM (csrc/gemm) where it runs: fp32 CPU tensors of 2 or 3 dims and enough work.

Why: the MKL in torch's CPU wheels takes its AVX2 path on AMD CPUs; csrc/gemm runs about 2x faster
there (benchmarks/bench_gemm.py). Results differ from torch.matmul only by fp32 summation order. The
first use checks the kernel against a float64 product; a mismatch disables it with a warning.
"""
from __future__ import annotations

import warnings

import torch

from . import _config

_MIN_FLOPS = 4.0e6   # below this a parallel region and packing cost more than they save
_MIN_COLUMNS = 16    # the micro-kernel pads columns to whole 32-wide panels
_state: dict[str, object] = {}


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
    if not (a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == torch.float32
            and b.dtype == torch.float32 and a.dim() in (2, 3) and b.dim() in (2, 3)):
        return False
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] != b.shape[0]:
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False
    batch = a.shape[0] if a.dim() == 3 else (b.shape[0] if b.dim() == 3 else 1)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    columns = m if (a.dim() == 2 and b.dim() == 3) else n  # that case runs transposed (see gemm_cpu)
    if 2.0 * batch * m * k * n < _MIN_FLOPS or columns < _MIN_COLUMNS:
        return False
    if _config.backend_override() not in (None, "cpu"):
        return False
    return _available()


def _available() -> bool:
    if "ok" not in _state:
        _state["ok"] = _self_test()
    return bool(_state["ok"])


def _self_test() -> bool:
    try:
        from . import _extension

        gen = torch.Generator().manual_seed(0)
        a = torch.randn(2, 29, 41, generator=gen)
        b = torch.randn(41, 37, generator=gen)
        l = torch.randn(23, 29, generator=gen)
        checks = [(_extension.gemm_cpu(a, b), a.double() @ b.double()),
                  (_extension.gemm_cpu(l, a), l.double() @ a.double())]
    except ImportError:
        return False
    except Exception as exc:  # a broken build: fall back, say why
        warnings.warn(f"source_fast: compiled GEMM disabled ({exc.__class__.__name__}: {exc}); using torch.matmul",
                      RuntimeWarning, stacklevel=3)
        return False
    for got, want in checks:
        if not torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item()):
            warnings.warn("source_fast: compiled GEMM disagrees with a float64 product on a tiny case; "
                          "using torch.matmul", RuntimeWarning, stacklevel=3)
            return False
    return True
