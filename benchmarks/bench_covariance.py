"""Benchmark source_fast.ops.covariance: C = Σ_r m_r x_r x_rᵀ over token rows x [R, D] (K-FAC factors A, S).

Implementations: every available source_fast backend (torch; cpu when source_fast._C is built; triton and
cuda on a CUDA device) and, as the baseline,

  kronfluence_addmm  Kronfluence's covariance step (kronfluence/module/tracker/factor.py): rows cast to the
                     covariance dtype (fp32), masked rows zeroed, then one full GEMM
                     ``C.addmm_(x.t(), x)`` (no symmetry exploited).

Modes: ``nomask`` and ``mask`` (a bool row mask with ~10% padding rows).
Shapes: CPU R×D ∈ {4096×513, 8192×1025}; CUDA adds 65536×2049 and 16384×4097 in fp32 and bf16, and the
memory-bound 2²⁴×32 (33 flop per element read: far below the ridge point of any GPU).
Flop model: R·D·(D+1) (the D(D+1)/2 distinct entries, 2R flops each); bytes: R·D read + D² fp32 written.

    python benchmarks/bench_covariance.py            # full run, upserts benchmarks/results/ops_<device>.csv
    python benchmarks/bench_covariance.py --smoke    # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import _harness as H
import torch
from _harness import case


class CovarianceBench(H.OpBench):
    op = "covariance"

    def cases(self, device, smoke):
        if smoke:
            return [case("nomask", R=64, D=17), case("mask", R=64, D=17)]
        cpu = [case("nomask", R=4096, D=513), case("mask", R=4096, D=513), case("nomask", R=8192, D=1025),
               case("mask", R=8192, D=1025),
               # narrow factors over many rows: a small CNN's conv patches (3·3·3 + 1, 16·3·3 + 1) and outputs
               case("nomask", R=131072, D=28), case("nomask", R=131072, D=16), case("nomask", R=32768, D=145)]
        if device.type != "cuda":
            return cpu
        big = []
        for dtype in ("float32", "bfloat16"):
            big += [case("nomask", dtype, R=8192, D=1025), case("nomask", dtype, R=65536, D=2049),
                    case("mask", dtype, R=65536, D=2049), case("nomask", dtype, R=16384, D=4097),
                    # Memory-bound (2·D flop per element read, below every GPU's ridge point): the
                    # bandwidth side of the roofline, for the "≥ 70 % of bandwidth" target.
                    case("nomask", dtype, R=2**24, D=32)]
        return big

    def gate_case(self, dtype):
        return case("mask", dtype, R=300, D=37)

    def make_inputs(self, c, device):
        gen = H.seeded(0)
        p = c.p
        x = H.randn(gen, p["R"], p["D"], device=device, dtype=c.torch_dtype)
        mask = None
        if c.mode == "mask":
            mask = (torch.rand(p["R"], generator=gen) > 0.1).to(device)
        return {"x": x, "mask": mask}

    def reference(self, inputs):
        from source_fast.reference import covariance_ref

        return covariance_ref(inputs["x"], inputs["mask"])

    def run_backend(self, backend, inputs):
        from source_fast import ops

        return ops.covariance(inputs["x"], inputs["mask"], backend=backend)

    def dispatch_tensors(self, inputs):
        return {"x": inputs["x"], "mask": inputs.get("mask")}

    def baselines(self):
        return {"kronfluence_addmm": kronfluence_covariance}

    def flops(self, c):
        p = c.p
        return p["R"] * p["D"] * (p["D"] + 1)

    def bytes(self, c):
        p = c.p
        return p["R"] * p["D"] * H.itemsize(c.torch_dtype) + p["D"] ** 2 * 4


def kronfluence_covariance(inputs):
    """Baseline: Kronfluence's per-module covariance update (factor.py `_update_*_covariance_matrix`)."""
    x = inputs["x"].to(torch.float32)  # activation/gradient_covariance_dtype (fp32 by default)
    if inputs["mask"] is not None:  # get_flattened_activation multiplies by the attention mask
        x = x * inputs["mask"].to(x.dtype)[:, None]
    d = x.shape[1]
    cov = torch.zeros(d, d, dtype=x.dtype, device=x.device)
    cov.addmm_(x.t(), x)
    return cov


if __name__ == "__main__":
    sys.exit(H.main(CovarianceBench()))
