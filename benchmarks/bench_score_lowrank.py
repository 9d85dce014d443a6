"""Benchmark source_fast.ops.score_lowrank: scores for low-rank query directions V_q = U_q W_qᵀ,
scores[q, n] = Σ_t Σ_r (U_qᵀ g_{n,t})_r (W_qᵀ a_{n,t})_r (neither V_q nor G_n formed).

Inputs u [Q, O, R], w [Q, I, R], a [N, T, I], g [N, T, O]. Implementations: every available source_fast
backend and two Kronfluence baselines (listed only when opt_einsum, which Kronfluence uses, is importable):

  kronfluence_lowrank  Kronfluence's pairwise score for low-rank query gradients (kronfluence/module/linear.py
                       `compute_pairwise_score` with a [left, right] preconditioned gradient):
                       ``contract_expression("qik,qko,b...i,b...o->qb", U, Wᵀ, g, a)`` on the path opt_einsum's
                       DynamicProgramming(search_outer=True, minimize="size") picks (built once, outside the
                       timing, as Kronfluence caches it), one batch of b training examples at a time.
  kronfluence_dense    The same scores from dense directions: V_q = U_q W_qᵀ materialised, then Kronfluence's default
                       ``contract_expression("qio,b...i,b...o->qb", V, g, a)`` (DynamicProgramming, minimize="flops").

Batches: b = N unless a [b, O, I] tensor exceeds 1 GiB on CPU / 4 GiB on CUDA (as in bench_score_pairwise.py).
Shapes: CPU Q=16, N=1024, T ∈ {1, 16}, I=513, O=257, R ∈ {8, 32}. CUDA adds Q ∈ {64, 512}, N=8192, I=1025,
O=1024, R=32, fp32 and bf16. Flop model: 2·Q·N·T·R·(O + I) + 2·Q·N·T·R (the two token projections per query,
then their product summed over ranks and tokens). Bytes: u, w, a, g read, scores (fp32) written.

    python benchmarks/bench_score_lowrank.py            # full run
    python benchmarks/bench_score_lowrank.py --smoke    # CI
"""
from __future__ import annotations

import importlib.util
import sys

import _harness as H
import torch
from _harness import case

_EXPRESSIONS: dict[tuple, object] = {}


def _have_opt_einsum() -> bool:
    return importlib.util.find_spec("opt_einsum") is not None


class ScoreLowrankBench(H.OpBench):
    op = "score_lowrank"

    def cases(self, device, smoke):
        if smoke:
            return [case("T=1,R=3", Q=3, N=8, T=1, I=9, O=5, R=3), case("T=4,R=3", Q=3, N=8, T=4, I=9, O=5, R=3)]
        out = [case(f"T={t},R={r}", Q=16, N=1024, T=t, I=513, O=257, R=r) for t in (1, 16) for r in (8, 32)]
        if device.type != "cuda":
            return out
        big = []
        for dtype in ("float32", "bfloat16"):
            for t in (1, 16):
                big += [case(f"T={t},R=32", dtype, Q=64, N=8192, T=t, I=1025, O=1024, R=32),
                        case(f"T={t},R=32", dtype, Q=512, N=8192, T=t, I=1025, O=1024, R=32)]
        return out + big

    def gate_case(self, dtype):
        return case("T=3,R=4", dtype, Q=5, N=12, T=3, I=17, O=9, R=4)

    def make_inputs(self, c, device):
        gen = H.seeded(5)
        p, dt = c.p, c.torch_dtype
        return {"u": H.randn(gen, p["Q"], p["O"], p["R"], device=device, dtype=dt),
                "w": H.randn(gen, p["Q"], p["I"], p["R"], device=device, dtype=dt),
                "a": H.randn(gen, p["N"], p["T"], p["I"], device=device, dtype=dt),
                "g": H.randn(gen, p["N"], p["T"], p["O"], device=device, dtype=dt)}

    def reference(self, x):
        from source_fast.reference import score_lowrank_ref

        return score_lowrank_ref(x["u"], x["w"], x["a"], x["g"])

    def run_backend(self, backend, x):
        from source_fast import ops

        return ops.score_lowrank(x["u"], x["w"], x["a"], x["g"], backend=backend)

    def baselines(self):
        if not _have_opt_einsum():
            return {}
        return {"kronfluence_lowrank": kronfluence_lowrank, "kronfluence_dense": kronfluence_dense}

    def note(self, impl, c, device):
        if impl.startswith("kronfluence"):
            p = c.p
            return f"batch={H.per_example_batch(p['N'], p['O'], p['I'], device)}"
        return ""

    def flops(self, c):
        p = c.p
        q, n, t, i, o, r = p["Q"], p["N"], p["T"], p["I"], p["O"], p["R"]
        return 2 * q * n * t * r * (o + i) + 2 * q * n * t * r

    def bytes(self, c):
        p = c.p
        s = H.itemsize(c.torch_dtype)
        return ((p["Q"] * p["R"] * (p["O"] + p["I"]) + p["N"] * p["T"] * (p["I"] + p["O"])) * s
                + p["Q"] * p["N"] * 4)


def _expression(expr: str, minimize: str, *shapes):
    """opt_einsum contract_expression for these shapes, built once (Kronfluence caches it per module)."""
    key = (expr, minimize, shapes)
    if key not in _EXPRESSIONS:
        from opt_einsum import DynamicProgramming, contract_expression

        _EXPRESSIONS[key] = contract_expression(expr, *shapes,
                                                optimize=DynamicProgramming(search_outer=True, minimize=minimize))
    return _EXPRESSIONS[key]


def kronfluence_lowrank(x):
    """Baseline: Kronfluence's low-rank pairwise-score expression, one batch of b training examples at a time.
    Kronfluence's labels: "i" indexes the output gradient (our O), "o" the activation (our I), "k" the rank."""
    u, w, a, g = x["u"], x["w"], x["a"], x["g"]
    n, _, i = a.shape
    o = g.shape[2]
    left, right = u, w.transpose(1, 2)  # [Q, O, R], [Q, R, I]
    b = H.per_example_batch(n, o, i, a.device, a.dtype)
    out = torch.empty(u.shape[0], n, dtype=u.dtype, device=u.device)
    for s in range(0, n, b):
        gs, as_ = g[s:s + b], a[s:s + b]
        fn = _expression("qik,qko,b...i,b...o->qb", "size", tuple(left.shape), tuple(right.shape), tuple(gs.shape),
                         tuple(as_.shape))
        out[:, s:s + b] = fn(left, right, gs, as_, backend="torch")
    return out


def kronfluence_dense(x):
    """Baseline: dense directions V_q = U_q W_qᵀ, then Kronfluence's default pairwise-score expression."""
    u, w, a, g = x["u"], x["w"], x["a"], x["g"]
    n, _, i = a.shape
    o = g.shape[2]
    v = torch.einsum("qor,qir->qoi", u, w)  # [Q, O, I]
    b = H.per_example_batch(n, o, i, a.device, a.dtype)
    out = torch.empty(u.shape[0], n, dtype=u.dtype, device=u.device)
    for s in range(0, n, b):
        gs, as_ = g[s:s + b], a[s:s + b]
        fn = _expression("qio,b...i,b...o->qb", "flops", tuple(v.shape), tuple(gs.shape), tuple(as_.shape))
        out[:, s:s + b] = fn(v, gs, as_, backend="torch")
    return out


if __name__ == "__main__":
    sys.exit(H.main(ScoreLowrankBench()))
