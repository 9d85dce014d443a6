"""Benchmark the float64 eigendecomposition of a covariance factor (source_fast._linalg.eigh, one per factor per
segment): torch.linalg.eigh (the LAPACK of torch's CPU wheels: MKL) against numpy.linalg.eigh (the OpenBLAS of
numpy's wheels), both the divide-and-conquer driver dsyevd, numpy's BLAS threads limited to torch's count as
source_fast runs it.

Implementations: ``torch`` and the baseline ``numpy``. Not a kernel of ours (no cpu/Triton/CUDA versions): the
table decides which LAPACK `_linalg.eigh_lapack` picks on a CPU vendor (MKL takes its generic paths on non-Intel
CPUs). Matrices: Q diag(λ) Qᵀ with a random orthogonal Q and λ ~ U(0, 10), like a damped covariance factor.
The gate compares the eigenvalues with λ.

    python benchmarks/bench_eigh.py --threads 2     # full run, upserts benchmarks/results/ops_<device>.csv
    (a CPU comparison: with --device cuda only torch's row runs; the numpy baseline reports an error row)
    python benchmarks/bench_eigh.py --smoke         # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import torch

import _harness as H
from _harness import case


class EighBench(H.CpuPrimitiveBench):
    op = "eigh"
    device_input = "matrix"

    def unavailable(self, impl, inputs):
        if impl == "torch":
            return None
        return "eigh has no kernel of ours: its two LAPACKs are torch (MKL) and the numpy baseline"

    def cases(self, device, smoke):
        if smoke:
            return [case("covariance factor", "float64", D=33)]
        return [case("covariance factor", "float64", D=d) for d in (129, 257, 513, 1025, 2049, 3073)]

    def gate_case(self, dtype):
        return case("covariance factor", "float64", D=41)

    def make_inputs(self, c, device):
        gen = H.seeded(c.p["D"])
        d = c.p["D"]
        q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
        values = torch.rand(d, generator=gen, dtype=torch.float64) * 10
        return {"matrix": ((q * values) @ q.T).to(device), "values": values.sort().values.to(device)}

    def reference(self, inputs):
        return inputs["values"]

    def run_backend(self, backend, inputs):
        return torch.linalg.eigh(inputs["matrix"])[0]  # the eigenvectors are computed too (dsyevd, JOBZ='V')

    def baselines(self):
        return {"numpy": _numpy_eigh}


def _numpy_eigh(inputs):
    import os

    from source_fast import _linalg

    if inputs["matrix"].device.type != "cpu":
        raise ValueError("numpy's LAPACK runs on CPU tensors only")
    previous = os.environ.get("SOURCE_FAST_EIGH_LAPACK")
    os.environ["SOURCE_FAST_EIGH_LAPACK"] = "numpy"  # what source_fast runs where it picks numpy's LAPACK
    try:
        return _linalg.eigh(inputs["matrix"])[0]
    finally:
        if previous is None:
            os.environ.pop("SOURCE_FAST_EIGH_LAPACK")
        else:
            os.environ["SOURCE_FAST_EIGH_LAPACK"] = previous


if __name__ == "__main__":
    sys.exit(H.main(EighBench()))
