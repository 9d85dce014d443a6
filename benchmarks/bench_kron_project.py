"""Benchmark source_fast.ops.kron_project: f(H) V = Q_S [f(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ for a batch V [Q, O, I].

Modes: ``fns=2(r,s)`` — the SOURCE accumulation r and propagation s of one segment sharing one rotation (what
the query walk needs), and ``fns=1(inverse)`` — the damped inverse of an influence function.
Implementations: every available source_fast backend and, as the baseline,

  kronfluence_matmul  Kronfluence's EK-FAC preconditioning (kronfluence/factor/config.py
                      `Ekfac.precondition_gradient`): ``q_s (((q_sᵀ (V q_a)) ⊙ W) q_aᵀ)`` with W = f(Λ)
                      precomputed (Kronfluence transforms Λ once when it prepares the factors); one full
                      rotation in and out per spectral function, since it has one preconditioner per call.

Shapes: CPU Q=64, O=257, I=513 (both modes) and Q=16, O=I=513. CUDA: up to Q=64, O=4096, I=4097, fp32 and bf16.
Flop model: (1 + F)·Q·2·O·I·(O + I) + F·Q·O·I for F spectral functions (shared rotation). Bytes: V read,
F outputs written, q_s, q_a, Λ read.

    python benchmarks/bench_kron_project.py            # full run
    python benchmarks/bench_kron_project.py --smoke    # CI
"""
from __future__ import annotations

import sys

import _harness as H
import torch
from _harness import case

C_SEGMENT = 0.7   # learning-rate mass of the segment (c·λ ~ 1 for λ ~ |N(0, 1)|)
DAMPING = 0.1


def spectral_fns(mode):
    from source_fast import spectral

    if mode.startswith("fns=2"):
        return (spectral.accumulation(C_SEGMENT), spectral.propagation(C_SEGMENT))
    return (spectral.inverse(DAMPING),)


class KronProjectBench(H.OpBench):
    op = "kron_project"

    def cases(self, device, smoke):
        if smoke:
            return [case("fns=2(r,s)", Q=3, O=5, I=9), case("fns=1(inverse)", Q=3, O=5, I=9)]
        out = [case("fns=2(r,s)", Q=64, O=257, I=513), case("fns=1(inverse)", Q=64, O=257, I=513),
               case("fns=2(r,s)", Q=16, O=513, I=513)]
        if device.type != "cuda":
            return out
        big = []
        for dtype in ("float32", "bfloat16"):
            big += [case("fns=2(r,s)", dtype, Q=64, O=257, I=513), case("fns=2(r,s)", dtype, Q=256, O=1024, I=1025),
                    case("fns=1(inverse)", dtype, Q=256, O=1024, I=1025),
                    case("fns=2(r,s)", dtype, Q=64, O=4096, I=4097)]
        return big

    def gate_case(self, dtype):
        return case("fns=2(r,s)", dtype, Q=4, O=9, I=17)

    def make_inputs(self, c, device):
        from source_fast import spectral

        gen = H.seeded(2)
        p, dt = c.p, c.torch_dtype
        lam = H.randn(gen, p["O"], p["I"], device=device, dtype=dt).abs()
        fns = spectral_fns(c.mode)
        return {"v": H.randn(gen, p["Q"], p["O"], p["I"], device=device, dtype=dt),
                "q_s": H.orthogonal(gen, p["O"], device, dt), "q_a": H.orthogonal(gen, p["I"], device, dt),
                "lam": lam, "fns": fns,
                # Kronfluence stores the transformed Λ (e.g. 1/(Λ+δ)) once, in the score dtype
                "w_fns": tuple(spectral.evaluate(f, lam.float()).to(dt) for f in fns)}

    def reference(self, x):
        from source_fast.reference import kron_project_ref

        return kron_project_ref(x["v"], x["q_s"], x["q_a"], x["lam"], x["fns"])

    def run_backend(self, backend, x):
        from source_fast import ops

        return ops.kron_project(x["v"], x["q_s"], x["q_a"], x["lam"], x["fns"], backend=backend)

    def dispatch_tensors(self, x):
        return {k: x[k] for k in ("v", "q_s", "q_a", "lam")}

    def baselines(self):
        return {"kronfluence_matmul": kronfluence_precondition}

    def flops(self, c):
        p = c.p
        f = 2 if c.mode.startswith("fns=2") else 1
        q, o, i = p["Q"], p["O"], p["I"]
        return (1 + f) * q * 2 * o * i * (o + i) + f * q * o * i

    def bytes(self, c):
        p = c.p
        f = 2 if c.mode.startswith("fns=2") else 1
        s = H.itemsize(c.torch_dtype)
        return (p["Q"] * p["O"] * p["I"] * (1 + f) + p["O"] ** 2 + p["I"] ** 2 + p["O"] * p["I"]) * s


def kronfluence_precondition(x):
    """Baseline: Kronfluence's EK-FAC precondition_gradient, once per spectral function (see module doc)."""
    v, q_s, q_a = x["v"], x["q_s"], x["q_a"]
    out = []
    for w in x["w_fns"]:
        rotated = torch.matmul(q_s.t(), torch.matmul(v, q_a))
        rotated.mul_(w)
        out.append(torch.matmul(q_s, torch.matmul(rotated, q_a.t())))
    return tuple(out)


if __name__ == "__main__":
    sys.exit(H.main(KronProjectBench()))
