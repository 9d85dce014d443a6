"""Bitwise run-to-run determinism of every GPU kernel (issue: 50 runs, bitwise), fp32 and bf16.

Shapes are large enough that the kernels split work across many blocks (and split-K partials where a
kernel has them), so an atomic or an unordered reduction would show up as a differing bit.
"""
import pytest
import torch

from _backends import backend_params, require
from source_fast import ops, spectral

GPU_BACKENDS = backend_params("cuda")
RUNS = 50


def _case(op, dtype):
    gen = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", dtype)

    def basis(n):
        return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0].to("cuda", torch.float32)

    n, t, i, o, q, r = 300, 7, 130, 70, 9, 5
    a, g = rnd(n, t, i), rnd(n, t, o)
    if op == "covariance":
        x = rnd(4096, 257)
        return {"x": x}, lambda: ops.covariance(x, deterministic=True)
    if op == "lambda_accum":
        qa, qs = basis(i), basis(o)
        return {"a": a, "g": g, "q_a": qa, "q_s": qs}, lambda: ops.lambda_accum(a, g, qa, qs, deterministic=True)
    if op == "kron_project":
        v, qa, qs = rnd(q, o, i), basis(i), basis(o)
        lam = torch.rand(o, i, generator=gen).to("cuda")
        fns = (spectral.accumulation(3.0), spectral.propagation(3.0))
        return ({"v": v, "q_s": qs, "q_a": qa, "lam": lam},
                lambda: torch.stack(ops.kron_project(v, qs, qa, lam, fns, deterministic=True)))
    if op == "score_pairwise":
        v = rnd(q, o, i)
        return {"v": v, "a": a, "g": g}, lambda: ops.score_pairwise(v, a, g, deterministic=True)
    if op == "score_self":
        qa, qs, w = basis(i), basis(o), torch.rand(o, i, generator=gen).to("cuda")
        return ({"a": a, "g": g, "q_s": qs, "q_a": qa, "weights": w},
                lambda: ops.score_self(a, g, qs, qa, w, deterministic=True))
    if op == "score_lowrank":
        u, w = rnd(q, o, r), rnd(q, i, r)
        return {"u": u, "w": w, "a": a, "g": g}, lambda: ops.score_lowrank(u, w, a, g, deterministic=True)
    v = rnd(q, o, i)
    return {"v": v, "a": a, "g": g}, lambda: ops.score_per_token(v, a, g, deterministic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["covariance", "lambda_accum", "kron_project", "score_pairwise", "score_self",
                                "score_lowrank", "score_per_token"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_kernels_bitwise_deterministic_over_50_runs(backend, op, dtype, monkeypatch):
    tensors, run = _case(op, dtype)
    require(backend, op, tensors, deterministic=True)
    monkeypatch.setenv("SOURCE_FAST_BACKEND", backend)  # every call in `run` goes to this backend
    first = run()
    for k in range(RUNS - 1):
        assert torch.equal(first, run()), f"{op} on {backend}: run {k + 2} differs from run 1"
