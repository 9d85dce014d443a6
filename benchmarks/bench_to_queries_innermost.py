"""Benchmark the walk's accumulation term W = r(Λ) ⊙ ũ written into the queries-innermost layout the sparse
scoring kernel reads (csrc/to_queries_innermost, used by walk._accumulation_term) against torch.mul into that
layout, which reads ũ a page per element.

Implementations: ``torch`` (torch.mul(x, r, out=<[O, I, Qs] buffer>)) and ``cpu``
(source_fast._C.to_queries_innermost_cpu: 16 x 16 blocks transposed in registers). Not a public op: no
Triton/CUDA versions (on GPUs the layout is not used).

Mode ``walk``: x [Q, O, I], r [O, I] (the MLP 784→512→256→10 layers, 200 queries). Bytes: x read and the
[O, I, Qs] buffer written once (fp32); no flop model.

    python benchmarks/bench_to_queries_innermost.py            # full run, upserts benchmarks/results/ops_<device>.csv
    python benchmarks/bench_to_queries_innermost.py --smoke    # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import _harness as H
import torch
from _harness import case


class ToQueriesInnermostBench(H.CpuPrimitiveBench):
    op = "to_queries_innermost"
    device_input = "x"  # the input whose device decides

    def cases(self, device, smoke):
        if smoke:
            return [case("walk", Q=5, O=9, I=33)]
        return [case("walk", Q=200, O=256, I=513), case("walk", Q=200, O=512, I=785)]

    def gate_case(self, dtype):
        return case("walk", dtype, Q=19, O=7, I=41)

    def make_inputs(self, c, device):
        gen = H.seeded(0)
        p = c.p
        from source_fast import _extension

        out = _extension.queries_innermost_empty(p["Q"], p["O"], p["I"], dtype=torch.float32, device=device)
        return {"x": H.randn(gen, p["Q"], p["O"], p["I"], device=device),
                "r": H.randn(gen, p["O"], p["I"], device=device).abs_(), "out": out}

    def reference(self, inputs):
        from source_fast.reference import to_queries_innermost_ref

        return to_queries_innermost_ref(inputs["x"], inputs["r"])

    def run_backend(self, backend, inputs):
        if backend == "torch":
            return torch.mul(inputs["x"], inputs["r"], out=inputs["out"])
        from source_fast import _extension

        return _extension.to_queries_innermost_cpu(inputs["x"], inputs["r"], out=inputs["out"])

    def bytes(self, c):
        p = c.p
        return 4 * p["O"] * p["I"] * (p["Q"] + -(-p["Q"] // 16) * 16)


if __name__ == "__main__":
    sys.exit(H.main(ToQueriesInnermostBench()))
