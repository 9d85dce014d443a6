"""Benchmark source_fast.ops.score_pairwise: scores[q, n] = ⟨V_q, G_n⟩ = Σ_t g_{n,t}ᵀ V_q a_{n,t}.

Inputs v [Q, O, I] (preconditioned query directions), a [N, T, I], g [N, T, O]. Implementations: every
available source_fast backend and two Kronfluence baselines:

  kronfluence_einsum       Kronfluence's default per-module pairwise score (kronfluence/module/linear.py
                           `compute_pairwise_score`): one three-operand ``einsum("qio,b...i,b...o->qb", V, g, a)``
                           contracted along the path opt_einsum's DynamicProgramming(search_outer=True,
                           minimize="flops") picks (computed once, outside the timing, as Kronfluence caches it),
                           per batch of b examples (as below; b = N for the CPU shapes).
  kronfluence_per_example  Per-example gradients materialised, then contracted with the preconditioned query
                           gradients (Kronfluence's path when per-sample gradients are post-processed,
                           module/tracker/pairwise_score.py): ``G = einsum("b...i,b...o->bio", g, a)``,
                           ``einsum("qio,tio->qt", V, G)``, one batch of b examples at a time (b = N unless
                           [b, O, I] exceeds 1 GiB on CPU / 4 GiB on CUDA).

Shapes: CPU Q ∈ {16, 200}, N=1024, T ∈ {1, 16}, I=513, O=257, and T=1 with half of g exactly zero (Z=50: a
ReLU-gated layer, where the CPU backend contracts only the nonzero g; its GFLOP/s are dense-equivalent; V is
then given queries-innermost, the layout the pipeline stores it in, to every implementation); and T=2 with the
same zeros on both tokens (ZT=1: a SOURCE segment's two checkpoints stacked, scored by one formed row of G_n
per nonzero (n, o)); and a ReLU MLP's hidden layer (Q=200, N=4096, I=129, O=128) with half of g zero, then
also ZA % of a zero (its unrotated inputs: the sparse-a-and-g kernel, Q·nnz(a)·nnz(g)).
CUDA adds N·O·I up to ~8.6e9, fp32 and bf16. Flop model: min(token-wise 2·Q·N·T·O·(I+1), materialising 2·N·T·O·I + 2·Q·N·O·I) (the cost model of
source_fast._torch_ops.pairwise_strategy). Bytes: V, a, g read, scores (fp32) written.

    python benchmarks/bench_score_pairwise.py            # full run
    python benchmarks/bench_score_pairwise.py --smoke    # CI
"""
from __future__ import annotations

import sys

import _harness as H
import torch
from _harness import case

_PATHS: dict[tuple, list[int]] = {}


class ScorePairwiseBench(H.OpBench):
    op = "score_pairwise"

    def cases(self, device, smoke):
        if smoke:
            return [case("T=1", Q=3, N=8, T=1, I=9, O=5), case("T=4", Q=3, N=8, T=4, I=9, O=5)]
        out = [case(f"T={t}", Q=q, N=1024, T=t, I=513, O=257) for q in (16, 200) for t in (1, 16)]
        if device.type != "cuda":
            # ReLU-gated output gradients: half of g exactly zero (the CPU backend's sparse-g kernel); and
            # two tokens with the same zeros (a segment's two checkpoints stacked: ZT=1).
            return out + [case("T=1 g half zeros", Q=q, N=1024, T=1, I=513, O=257, Z=50) for q in (16, 200)] \
                + [case("T=2 g half zeros, same on both tokens", Q=200, N=1024, T=2, I=513, O=257, Z=50, ZT=1)] \
                + [case("T=1 g half zeros (a ReLU MLP's hidden layer)", Q=200, N=4096, T=1, I=129, O=128, Z=50),
                   case("T=1 a and g half zeros (its unrotated rows: sparse a)", Q=200, N=4096, T=1, I=129, O=128,
                        Z=50, ZA=50),
                   case("T=1 a 70 % and g half zeros (sparse a)", Q=200, N=4096, T=1, I=129, O=128, Z=50, ZA=70)]
        big = []
        for dtype in ("float32", "bfloat16"):
            for t in (1, 16):
                big += [case(f"T={t}", dtype, Q=200, N=1024, T=t, I=513, O=257),
                        case(f"T={t}", dtype, Q=64, N=8192, T=t, I=1025, O=1024),
                        case(f"T={t}", dtype, Q=512, N=8192, T=t, I=1025, O=1024)]
        return big

    def gate_case(self, dtype):
        return case("T=3", dtype, Q=5, N=12, T=3, I=17, O=9)

    def make_inputs(self, c, device):
        gen = H.seeded(3)
        p, dt = c.p, c.torch_dtype
        x = {"v": H.randn(gen, p["Q"], p["O"], p["I"], device=device, dtype=dt),
             "a": H.randn(gen, p["N"], p["T"], p["I"], device=device, dtype=dt),
             "g": H.randn(gen, p["N"], p["T"], p["O"], device=device, dtype=dt)}
        if p.get("Z"):  # Z % of g exactly zero, as after a ReLU; V stored queries-innermost as the pipeline does
            shape = (p["N"], 1, p["O"]) if p.get("ZT") else x["g"].shape  # ZT: one pattern for every token
            keep = torch.rand(shape, generator=gen).to(device) >= p["Z"] / 100
            x["g"] = x["g"] * keep.to(dt)
            if p.get("ZA"):  # ZA % of a exactly zero too (a ReLU layer's inputs, unrotated)
                keep_a = torch.rand((p["N"], 1, p["I"]), generator=gen).to(device) >= p["ZA"] / 100
                x["a"] = x["a"] * keep_a.to(dt)
            from source_fast import _extension

            x["v"] = _extension._sparse_layout(x["v"])
        return x

    def reference(self, x):
        from source_fast.reference import score_pairwise_ref

        return score_pairwise_ref(x["v"], x["a"], x["g"])

    def run_backend(self, backend, x):
        from source_fast import ops

        return ops.score_pairwise(x["v"], x["a"], x["g"], backend=backend)

    def baselines(self):
        return {"kronfluence_einsum": kronfluence_einsum, "kronfluence_per_example": kronfluence_per_example}

    def note(self, impl, c, device):
        p = c.p
        if impl == "kronfluence_per_example":
            return f"per-example batch={H.per_example_batch(p['N'], p['O'], p['I'], device)}"
        if impl == "kronfluence_einsum":
            bsz = H.per_example_batch(p['N'], p['O'], p['I'], device)
            return f"batch={bsz}, einsum path={einsum_path(p['Q'], bsz, p['T'], p['O'], p['I'])}"
        return ""

    def flops(self, c):
        p = c.p
        q, n, t, i, o = p["Q"], p["N"], p["T"], p["I"], p["O"]
        return min(2 * q * n * t * o * (i + 1), 2 * n * t * o * i + 2 * q * n * o * i)

    def bytes(self, c):
        p = c.p
        s = H.itemsize(c.torch_dtype)
        return (p["Q"] * p["O"] * p["I"] + p["N"] * p["T"] * (p["I"] + p["O"])) * s + p["Q"] * p["N"] * 4


def einsum_path(q, n, t, o, i) -> list[int]:
    """opt_einsum's DynamicProgramming path for Kronfluence's expression, flattened as Kronfluence does."""
    key = (q, n, t, o, i)
    if key not in _PATHS:
        from opt_einsum import DynamicProgramming, contract_path

        path = contract_path("qio,bti,bto->qb", (q, o, i), (n, t, o), (n, t, i), shapes=True,
                             optimize=DynamicProgramming(search_outer=True, minimize="flops"))[0]
        _PATHS[key] = [k for pair in path for k in pair]
    return _PATHS[key]


def kronfluence_einsum(x):
    """Baseline: Kronfluence's default three-operand pairwise-score einsum (see module doc), one batch of b
    training examples at a time (Kronfluence scores per training batch; b as for the per-example baseline)."""
    from torch import _VF

    v, a, g = x["v"], x["a"], x["g"]
    n, t, i = a.shape
    o = g.shape[2]
    b = H.per_example_batch(n, o, i, a.device, v.dtype)
    out = torch.empty(v.shape[0], n, dtype=v.dtype, device=v.device)
    for s in range(0, n, b):
        gs, as_ = g[s:s + b], a[s:s + b]
        path = einsum_path(v.shape[0], gs.shape[0], t, o, i)
        # Kronfluence's labels: "i" indexes the output gradient (our O), "o" the activation (our I).
        out[:, s:s + b] = _VF.einsum("qio,b...i,b...o->qb", (v, gs, as_), path=path)  # pylint: disable=no-member
    return out


def kronfluence_per_example(x):
    """Baseline: materialised per-example gradients, then an einsum with the query directions."""
    v, a, g = x["v"], x["a"], x["g"]
    n, _, i = a.shape
    o = g.shape[2]
    out = torch.empty(v.shape[0], n, dtype=v.dtype, device=v.device)
    b = H.per_example_batch(n, o, i, a.device, v.dtype)
    for s in range(0, n, b):
        per_sample = torch.einsum("b...i,b...o->bio", g[s:s + b], a[s:s + b])  # [b, O, I]
        out[:, s:s + b] = torch.einsum("qio,tio->qt", v, per_sample)
    return out


if __name__ == "__main__":
    sys.exit(H.main(ScorePairwiseBench()))
