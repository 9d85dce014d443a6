"""Benchmark source_fast.ops.lambda_accum (EK-FAC eigenvalue correction):
Λ = Σ_n (Q_Sᵀ G_n Q_A)², G_n = Σ_t g_{n,t} a_{n,t}ᵀ.

Inputs a [N, T, I], g [N, T, O], orthogonal q_a [I, I], q_s [O, O]. Implementations: every available
source_fast backend and, as the baseline,

  kronfluence_per_example  Kronfluence's eigenvalue-correction step (kronfluence/module/linear.py
                           `compute_per_sample_gradient` + module/tracker/factor.py `_update_lambda_matrix`):
                           materialise per-example gradients ``einsum("b...i,b...o->bio", g, a)`` [b, O, I],
                           rotate ``q_sᵀ (G q_a)``, square and sum over examples (fp32, the lambda dtype), one
                           batch of b examples at a time (b = N unless [b, O, I] exceeds 1 GiB on CPU / 4 GiB
                           on CUDA).

Shapes: CPU N=512, T ∈ {1, 16}, (I, O) ∈ {(257, 129), (513, 257)}, and a small CNN's conv layers ("conv
positions": 128 images, T = 256 positions of a 16→32 3×3 conv, T = 1024 of a 3→16 one). CUDA: N·O·I up to ~8.6e9
in fp32 and bf16. Flop model (what the op must do, in the cheaper order of `_torch_ops.rotation_order`): rows
first: rotations 2·N·T·(I² + O²), plus T=1: 2·N·O·I (one GEMM of squares), T>1: 2·N·T·O·I (per-example outer
products) + 2·N·O·I (square, sum); G_n first: 2·N·T·O·I (forming G_n) + 2·N·O·I·(O + I) (rotating it) + 2·N·O·I.
Bytes: a, g, q_a, q_s read, Λ written.

    python benchmarks/bench_lambda_accum.py            # full run
    python benchmarks/bench_lambda_accum.py --smoke    # CI
"""
from __future__ import annotations

import sys

import _harness as H
import torch
from _harness import case


class LambdaAccumBench(H.OpBench):
    op = "lambda_accum"

    def cases(self, device, smoke):
        if smoke:
            return [case("T=1", N=8, T=1, I=9, O=5), case("T=4", N=8, T=4, I=9, O=5)]
        out = []
        for i, o in ((257, 129), (513, 257)):
            for t in (1, 16):
                out.append(case(f"T={t}", N=512, T=t, I=i, O=o))
        out += [case("conv positions", N=128, T=256, I=145, O=32), case("conv positions", N=128, T=1024, I=28, O=16)]
        if device.type != "cuda":
            return out
        return H.gpu_token_cases() + H.gpu_conv_cases()

    def gate_case(self, dtype):
        return case("T=3", dtype, N=12, T=3, I=17, O=9)

    def make_inputs(self, c, device):
        gen = H.seeded(1)
        p, dt = c.p, c.torch_dtype
        return H.token_inputs(gen, p, device, dt)

    def reference(self, x):
        from source_fast.reference import lambda_accum_ref

        return lambda_accum_ref(x["a"], x["g"], x["q_a"], x["q_s"])

    def run_backend(self, backend, x):
        from source_fast import ops

        return ops.lambda_accum(x["a"], x["g"], x["q_a"], x["q_s"], backend=backend)

    def baselines(self):
        return {"kronfluence_per_example": kronfluence_lambda}

    def note(self, impl, c, device):
        if impl.startswith("kronfluence"):
            p = c.p
            return f"per-example batch={H.per_example_batch(p['N'], p['O'], p['I'], device)}"
        return ""

    def flops(self, c):
        p = c.p
        n, t, i, o = p["N"], p["T"], p["I"], p["O"]
        if t == 1:
            return 2 * n * (i * i + o * o) + 2 * n * o * i
        return min(2 * n * t * (i * i + o * o), 2 * n * o * i * (o + i)) + 2 * n * t * o * i + 2 * n * o * i

    def bytes(self, c):
        p = c.p
        s = H.itemsize(c.torch_dtype)
        return (p["N"] * p["T"] * (p["I"] + p["O"]) + p["I"] ** 2 + p["O"] ** 2) * s + p["O"] * p["I"] * 4


def kronfluence_lambda(x):
    """Baseline: Kronfluence's per-module Λ update, per-example gradients materialised (see module doc)."""
    a, g = x["a"], x["g"]
    q_a, q_s = x["q_a"].float(), x["q_s"].float()  # lambda_dtype: fp32
    n, _, i = a.shape
    o = g.shape[2]
    lam = torch.zeros(o, i, dtype=torch.float32, device=a.device)
    b = H.per_example_batch(n, o, i, a.device)
    for s in range(0, n, b):
        per_sample = torch.einsum("b...i,b...o->bio", g[s:s + b], a[s:s + b]).to(torch.float32)  # [b, O, I]
        lam.add_(torch.matmul(q_s.t(), torch.matmul(per_sample, q_a)).square_().sum(dim=0))
    return lam


if __name__ == "__main__":
    sys.exit(H.main(LambdaAccumBench()))
