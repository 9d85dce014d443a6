"""The one tolerance table: op × backend × dtype → (atol_factor, rtol), and the rule that uses it.

Oracle: the float64 reference (`upcast=True`) on the same inputs (input rounding is not blamed on
the kernel).

- fp32 (and float64): |Δ| ≤ atol + rtol·|ref| with atol = atol_factor · max|ref| (scores and
  covariances span orders of magnitude; entries of a contraction that cancel to ~0 carry the
  rounding of the large terms).
- fp16 / bf16 (flash-attention's rule): error vs the oracle ≤ 2 × the error of the same-precision
  torch baseline (the reference with `upcast=False`) + slack, slack = atol_factor · max|ref|
  (about one unit roundoff of the dtype at the output's scale); rtol is 0. It adapts to shape and
  conditioning without per-shape constants.

Changing a value here is a reviewed design change (STYLE.md §4): say why in the commit.
Observed on the tests/ops shape grids (max |Δ| / max|ref|), Triton interpreter and torch CPU:
fp32 ≤ 6e-7 for every op (the fp32 atol_factor leaves a 15-50× margin). fp16: covariance,
score_pairwise, kron_project ≤ 4e-7 (fp32 accumulation of exact fp16 products); lambda_accum and
score_self on Triton ≤ 7e-4, 0.4-1.9× the fp16 baseline's error (the kernels round eigenvectors and
rotated tokens to fp16 for tensor cores; the torch backend computes those in fp32, ≤ 6e-7).
"""
from __future__ import annotations

import math

import torch

from _asserts import assert_close_report

LOW_PRECISION = (torch.float16, torch.bfloat16)

# Defaults by dtype: fp32 allows ~20-100× the observed error; fp16/bf16 entries are the slack.
_DEFAULT = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-4, 0.0),   # 2^-11: one fp16 unit roundoff at the output's scale
    torch.bfloat16: (4e-3, 0.0),  # 2^-8
}

# Per (op, backend, dtype) overrides; backend "*" matches any backend.
TOLERANCES: dict[tuple[str, str, torch.dtype], tuple[float, float]] = {
    # Long contractions over O·I·T products, then fp32 scaling/rotations: a little looser.
    ("kron_project", "*", torch.float32): (2e-5, 2e-5),
    ("score_pairwise", "*", torch.float32): (2e-5, 2e-5),
    ("score_self", "*", torch.float32): (2e-5, 2e-5),
    ("lambda_accum", "*", torch.float32): (2e-5, 2e-5),
}


def lookup(op: str, backend: str, dtype: torch.dtype) -> tuple[float, float]:
    for key in ((op, backend, dtype), (op, "*", dtype)):
        if key in TOLERANCES:
            return TOLERANCES[key]
    return _DEFAULT[dtype]


def bounds(op: str, backend: str, dtype: torch.dtype, oracle: torch.Tensor,
           baseline: torch.Tensor | None = None) -> tuple[float, float]:
    """(atol, rtol) for comparing a `dtype` computation of `op` on `backend` with the float64 oracle."""
    factor, rtol = lookup(op, backend, dtype)
    scale = float(oracle.abs().max()) if oracle.numel() else 0.0
    if dtype in LOW_PRECISION:
        if baseline is None:
            raise ValueError(f"{op}: the {dtype} rule needs the same-precision baseline (reference, upcast=False)")
        base_err = float((baseline.to(torch.float64) - oracle.to(torch.float64)).abs().max()) if oracle.numel() else 0.0
        if not math.isfinite(base_err):
            raise ValueError(f"{op}: the {dtype} baseline is not finite (it overflows or is NaN where the float64 "
                             "oracle is finite), so the 2×-baseline rule would accept anything; use inputs the "
                             f"{dtype} reference can represent")
        return 2.0 * base_err + factor * scale, rtol
    return factor * scale, rtol


def assert_matches_oracle(actual: torch.Tensor, oracle: torch.Tensor, *, op: str, backend: str, dtype: torch.dtype,
                          baseline: torch.Tensor | None = None, name: str | None = None) -> dict:
    """Apply the table's rule (see module docstring); returns the observed metrics."""
    atol, rtol = bounds(op, backend, dtype, oracle, baseline)
    label = name or f"{op}[{backend}, {dtype}]"
    return assert_close_report(actual, oracle.to(torch.float64), atol=atol, rtol=rtol, name=label)
