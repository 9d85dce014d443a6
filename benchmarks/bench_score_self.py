"""Benchmark source_fast.ops.score_self: s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij = ⟨G_n, f(H) G_n⟩ (self-influence).

Inputs a [N, T, I], g [N, T, O], orthogonal q_s [O, O], q_a [I, I], weights W = f(Λ) [O, I] (≥ 0).
Implementations: every available source_fast backend and, as the baseline,

  kronfluence_per_example  Kronfluence's self-influence step (kronfluence/module/tracker/self_score.py
                           `_compute_self_score` with factor/config.py `Ekfac.precondition_gradient`):
                           per-example gradients ``einsum("b...i,b...o->bio", g, a)`` [b, O, I], preconditioned
                           ``q_s (((q_sᵀ (G q_a)) ⊙ W) q_aᵀ)``, multiplied by G and summed over (O, I); one batch
                           of b examples at a time (b = N unless [b, O, I] exceeds 1 GiB on CPU / 4 GiB on CUDA).

Shapes: CPU N=1024, T ∈ {1, 16}, I=513, O=257, and a small CNN's conv layers ("conv positions", as in
bench_lambda_accum.py). CUDA adds N·O·I up to ~8.6e9, fp32 and bf16. Flop model: T=1: rotations 2·N·(I² + O²)
+ 2·N·O·I + 2·N·I ((Q_Sᵀg)² W, dot with (Q_Aᵀa)²); T>1: 2·N·T·O·I + 3·N·O·I plus the cheaper of rotating the
rows, 2·N·T·(I² + O²), and rotating G_n, 2·N·O·I·(O + I) (`_torch_ops.rotation_order`). Bytes: a, g, q_s,
q_a, W read, s written.

    python benchmarks/bench_score_self.py            # full run
    python benchmarks/bench_score_self.py --smoke    # CI
"""
from __future__ import annotations

import sys

import _harness as H
import torch
from _harness import case


class ScoreSelfBench(H.OpBench):
    op = "score_self"

    def cases(self, device, smoke):
        if smoke:
            return [case("T=1", N=8, T=1, I=9, O=5), case("T=4", N=8, T=4, I=9, O=5)]
        out = [case(f"T={t}", N=1024, T=t, I=513, O=257) for t in (1, 16)]
        out += [case("conv positions", N=128, T=256, I=145, O=32), case("conv positions", N=128, T=1024, I=28, O=16)]
        if device.type != "cuda":
            return out
        return H.gpu_token_cases() + H.gpu_conv_cases()

    def gate_case(self, dtype):
        return case("T=3", dtype, N=12, T=3, I=17, O=9)

    def make_inputs(self, c, device):
        gen = H.seeded(4)
        p, dt = c.p, c.torch_dtype
        x = H.token_inputs(gen, p, device, dt)
        x["weights"] = (1.0 / (H.randn(gen, p["O"], p["I"], device=device).abs() + 0.1)).to(dt)
        return x

    def reference(self, x):
        from source_fast.reference import score_self_ref

        return score_self_ref(x["a"], x["g"], x["q_s"], x["q_a"], x["weights"])

    def run_backend(self, backend, x):
        from source_fast import ops

        return ops.score_self(x["a"], x["g"], x["q_s"], x["q_a"], x["weights"], backend=backend)

    def baselines(self):
        return {"kronfluence_per_example": kronfluence_self}

    def note(self, impl, c, device):
        if impl.startswith("kronfluence"):
            p = c.p
            return f"per-example batch={H.per_example_batch(p['N'], p['O'], p['I'], device)}"
        return ""

    def flops(self, c):
        p = c.p
        n, t, i, o = p["N"], p["T"], p["I"], p["O"]
        if t == 1:
            return 2 * n * (i * i + o * o) + 2 * n * o * i + 2 * n * i
        return min(2 * n * t * (i * i + o * o), 2 * n * o * i * (o + i)) + 2 * n * t * o * i + 3 * n * o * i

    def bytes(self, c):
        p = c.p
        s = H.itemsize(c.torch_dtype)
        return (p["N"] * p["T"] * (p["I"] + p["O"]) + p["I"] ** 2 + p["O"] ** 2 + p["O"] * p["I"]) * s + p["N"] * 4


def kronfluence_self(x):
    """Baseline: Kronfluence's EK-FAC self-influence with materialised per-example gradients."""
    a, g, q_s, q_a, w = x["a"], x["g"], x["q_s"], x["q_a"], x["weights"]
    n, _, i = a.shape
    o = g.shape[2]
    out = torch.empty(n, dtype=a.dtype, device=a.device)
    b = H.per_example_batch(n, o, i, a.device, a.dtype)
    for s in range(0, n, b):
        per_sample = torch.einsum("b...i,b...o->bio", g[s:s + b], a[s:s + b])  # [b, O, I]
        pre = torch.matmul(q_s.t(), torch.matmul(per_sample, q_a))
        pre.mul_(w)
        pre = torch.matmul(q_s, torch.matmul(pre, q_a.t()))
        pre.mul_(per_sample)
        out[s:s + b] = pre.sum(dim=(1, 2))
    return out


if __name__ == "__main__":
    sys.exit(H.main(ScoreSelfBench()))
