"""Benchmark the CPU GEMM behind basis rotations and the rotated query walk (csrc/gemm, used through
source_fast._linalg.matmul) against torch.matmul (MKL in torch's CPU wheels).

Implementations: ``torch`` (torch.matmul) and ``cpu`` (source_fast._C.gemm_batched_cpu). Not a public op:
no Triton/CUDA versions (on GPUs the rotations are cuBLAS calls or fused into kron_project).

Modes (the products of the pipeline, MLP 784→512→256→10 sizes):
  rows   token rows into an eigenbasis: a [R, I] @ Q_A [I, I]
  right  the right factor of a cross-basis change: X [B, O, I] @ M_A [I, I]
  left   the left factor: M_S [O, O] @ X [B, O, I] (runs transposed, the shared factor packed once)
Flop model 2·M·N·K per product; bytes: operands read once, output written once (fp32).

    python benchmarks/bench_gemm.py            # full run, upserts benchmarks/results/ops_<device>.csv
    python benchmarks/bench_gemm.py --smoke    # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import _harness as H
from _harness import case


class GemmBench(H.CpuPrimitiveBench):
    op = "gemm"
    device_input = "a"  # the input whose device decides

    def cases(self, device, smoke):
        if smoke:
            return [case("rows", R=20, I=33), case("right", B=2, O=9, I=33), case("left", B=2, O=33, I=17)]
        return [case("rows", R=128, I=785), case("rows", R=4096, I=785), case("right", B=32, O=512, I=785),
                case("left", B=32, O=512, I=785)]

    def gate_case(self, dtype):
        return case("left", dtype, B=3, O=37, I=41)

    def make_inputs(self, c, device):
        gen = H.seeded(0)
        p = c.p
        if c.mode == "rows":
            return {"a": H.randn(gen, p["R"], p["I"], device=device), "b": H.orthogonal(gen, p["I"], device)}
        if c.mode == "right":
            return {"a": H.randn(gen, p["B"], p["O"], p["I"], device=device), "b": H.orthogonal(gen, p["I"], device)}
        return {"a": H.orthogonal(gen, p["O"], device), "b": H.randn(gen, p["B"], p["O"], p["I"], device=device)}

    def reference(self, inputs):
        return inputs["a"].double() @ inputs["b"].double()

    def run_backend(self, backend, inputs):
        if backend == "torch":
            return inputs["a"] @ inputs["b"]
        from source_fast import _extension

        return _extension.gemm_cpu(inputs["a"], inputs["b"])

    def flops(self, c):
        m, n, k = self._mnk(c)
        return 2 * m * n * k

    def bytes(self, c):
        m, n, k = self._mnk(c)
        return 4 * (m * k + k * n + m * n)


if __name__ == "__main__":
    sys.exit(H.main(GemmBench()))
