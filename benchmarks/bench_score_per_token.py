"""Benchmark source_fast.ops.score_per_token: per-token scores out[q, n, t] = g_{n,t}ᵀ V_q a_{n,t}
(their sum over t is score_pairwise).

Inputs v [Q, O, I] (preconditioned query directions), a [N, T, I], g [N, T, O]; output [Q, N, T] fp32.
Implementations: every available source_fast backend and, as the baseline (listed only when opt_einsum,
which Kronfluence uses, is importable),

  kronfluence_per_token  Kronfluence's per-token pairwise score (kronfluence/module/linear.py
                         `compute_pairwise_score` with ``compute_per_token_scores=True``):
                         ``contract_expression("qio,bti,bto->qbt", V, g, a)`` on the path opt_einsum's
                         DynamicProgramming(search_outer=True, minimize="size") picks (built once, outside the
                         timing, as Kronfluence caches it), one batch of b training examples at a time; b = N
                         unless a [Q, b, T, max(O, I)] intermediate exceeds 1 GiB on CPU / 4 GiB on CUDA.

Shapes: CPU Q=16, N=256, T ∈ {1, 16}, I=513, O=257. CUDA adds Q ∈ {16, 64}, N=1024, T ∈ {16, 64}, I=1025,
O=1024, fp32 and bf16. Flop model: 2·Q·N·T·O·I + 2·Q·N·T·O (V_q a_{n,t} per token, then its dot with
g_{n,t}). Bytes: v, a, g read, per-token scores (fp32) written.

    python benchmarks/bench_score_per_token.py            # full run
    python benchmarks/bench_score_per_token.py --smoke    # CI
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


def per_token_batch(q: int, n: int, t: int, o: int, i: int, device: torch.device, dtype=torch.float32) -> int:
    """Examples per batch of the baseline: its largest intermediate [Q, b, T, max(O, I)] stays within 1 GiB on
    CPU and 4 GiB on CUDA (all of N when it fits)."""
    cap = (4 if device.type == "cuda" else 1) * 2**30
    return max(1, min(n, cap // max(1, q * t * max(o, i) * H.itemsize(dtype))))


class ScorePerTokenBench(H.OpBench):
    op = "score_per_token"

    def cases(self, device, smoke):
        if smoke:
            return [case("T=1", Q=3, N=8, T=1, I=9, O=5), case("T=4", Q=3, N=8, T=4, I=9, O=5)]
        out = [case(f"T={t}", Q=16, N=256, T=t, I=513, O=257) for t in (1, 16)]
        if device.type != "cuda":
            return out
        big = []
        for dtype in ("float32", "bfloat16"):
            big += [case("T=16", dtype, Q=64, N=1024, T=16, I=1025, O=1024),
                    case("T=64", dtype, Q=16, N=1024, T=64, I=1025, O=1024)]
        return out + big

    def gate_case(self, dtype):
        return case("T=3", dtype, Q=5, N=12, T=3, I=17, O=9)

    def make_inputs(self, c, device):
        gen = H.seeded(6)
        p, dt = c.p, c.torch_dtype
        return {"v": H.randn(gen, p["Q"], p["O"], p["I"], device=device, dtype=dt),
                "a": H.randn(gen, p["N"], p["T"], p["I"], device=device, dtype=dt),
                "g": H.randn(gen, p["N"], p["T"], p["O"], device=device, dtype=dt)}

    def reference(self, x):
        from source_fast.reference import score_per_token_ref

        return score_per_token_ref(x["v"], x["a"], x["g"])

    def run_backend(self, backend, x):
        from source_fast import ops

        return ops.score_per_token(x["v"], x["a"], x["g"], backend=backend)

    def baselines(self):
        return {"kronfluence_per_token": kronfluence_per_token} if _have_opt_einsum() else {}

    def note(self, impl, c, device):
        if impl.startswith("kronfluence"):
            p = c.p
            return f"batch={per_token_batch(p['Q'], p['N'], p['T'], p['O'], p['I'], device)}"
        return ""

    def flops(self, c):
        p = c.p
        q, n, t, i, o = p["Q"], p["N"], p["T"], p["I"], p["O"]
        return 2 * q * n * t * o * i + 2 * q * n * t * o

    def bytes(self, c):
        p = c.p
        s = H.itemsize(c.torch_dtype)
        return ((p["Q"] * p["O"] * p["I"] + p["N"] * p["T"] * (p["I"] + p["O"])) * s
                + p["Q"] * p["N"] * p["T"] * 4)


def _expression(*shapes):
    """opt_einsum contract_expression for these shapes, built once (Kronfluence caches it per module)."""
    if shapes not in _EXPRESSIONS:
        from opt_einsum import DynamicProgramming, contract_expression

        _EXPRESSIONS[shapes] = contract_expression("qio,bti,bto->qbt", *shapes,
                                                   optimize=DynamicProgramming(search_outer=True, minimize="size"))
    return _EXPRESSIONS[shapes]


def kronfluence_per_token(x):
    """Baseline: Kronfluence's per-token score expression, one batch of b training examples at a time.
    Kronfluence's labels: "i" indexes the output gradient (our O), "o" the activation (our I)."""
    v, a, g = x["v"], x["a"], x["g"]
    q = v.shape[0]
    n, t, i = a.shape
    o = g.shape[2]
    b = per_token_batch(q, n, t, o, i, a.device, a.dtype)
    out = torch.empty(q, n, t, dtype=v.dtype, device=v.device)
    for s in range(0, n, b):
        gs, as_ = g[s:s + b], a[s:s + b]
        out[:, s:s + b] = _expression(tuple(v.shape), tuple(gs.shape), tuple(as_.shape))(v, gs, as_, backend="torch")
    return out


if __name__ == "__main__":
    sys.exit(H.main(ScorePerTokenBench()))
