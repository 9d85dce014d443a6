"""Benchmark the output-side rotation of one-token influence directions (csrc/rank_one_product, used by
RankOneDirections.left_product_queries_innermost) against the torch product it replaces on CPU.

Implementations: ``torch`` (weight ⊙ g aᵀ formed a block of columns at a time, queries innermost, then
torch.matmul / the CPU GEMM: directions.py's fallback) and ``cpu`` (source_fast._C.rank_one_product_cpu: the
factors folded into the GEMM's operands, the result written queries-innermost directly). Not a public op: no
Triton/CUDA versions (on GPUs the torch product runs).

Mode ``influence``: left [P, O] (Q_S) @ (w ⊙ g_q a_qᵀ) for Q queries, P = O (MLP 784→512→256→10 layers and a
768-wide transformer projection). Flop model 2·Q·P·O·I; bytes: the [P, I, Qs] result written once (fp32).

    python benchmarks/bench_rank_one_product.py            # full run, upserts benchmarks/results/ops_<device>.csv
    python benchmarks/bench_rank_one_product.py --smoke    # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import _harness as H
from _harness import case


class RankOneProductBench(H.CpuPrimitiveBench):
    op = "rank_one_product"
    device_input = "left"  # the input whose device decides

    def cases(self, device, smoke):
        if smoke:
            return [case("influence", Q=5, O=9, I=33)]
        return [case("influence", Q=200, O=256, I=513), case("influence", Q=200, O=512, I=785),
                case("influence", Q=50, O=768, I=768)]

    def gate_case(self, dtype):
        return case("influence", dtype, Q=7, O=37, I=41)

    def make_inputs(self, c, device):
        gen = H.seeded(0)
        p = c.p
        return {"left": H.orthogonal(gen, p["O"], device), "g": H.randn(gen, p["Q"], p["O"], device=device),
                "a": H.randn(gen, p["Q"], p["I"], device=device),
                "weight": H.randn(gen, p["O"], p["I"], device=device).abs_().add_(0.1)}

    def reference(self, inputs):
        from source_fast.reference import rank_one_product_ref

        return rank_one_product_ref(inputs["left"], inputs["g"], inputs["a"], inputs["weight"])

    def run_backend(self, backend, inputs):
        from source_fast import _extension, directions

        if backend == "cpu":
            return _extension.rank_one_product_cpu(inputs["left"], inputs["g"], inputs["a"], inputs["weight"])
        saved = directions._compiled_rank_one_ok
        directions._compiled_rank_one_ok = lambda *args: False  # the fallback's own code path
        try:
            d = directions.RankOneDirections(inputs["g"], inputs["a"], inputs["weight"])
            return d.left_product_queries_innermost(inputs["left"])
        finally:
            directions._compiled_rank_one_ok = saved

    def flops(self, c):
        p = c.p
        return 2 * p["Q"] * p["O"] * p["O"] * p["I"]

    def bytes(self, c):
        p = c.p
        qs = -(-p["Q"] // 16) * 16
        return 4 * p["O"] * p["I"] * qs


if __name__ == "__main__":
    sys.exit(H.main(RankOneProductBench()))
