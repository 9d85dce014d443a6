"""First-use numerical self-test of a compiled backend: a tiny case against the float64 reference.

Returns None when the backend agrees, else a one-line description of the disagreement.
"""
from __future__ import annotations

import torch

from . import reference, spectral

_RTOL = 1e-3  # fp32 kernels on tiny shapes agree to ~1e-6; this only catches broken builds.
# 16-bit inputs against the float64 reference on the same (rounded) inputs: the kernels round the formed G_n to
# bf16 (2^-9 relative per element; fp16 2^-12) and accumulate in fp32; a broken kernel is off by O(1).
_RTOL_16BIT = 3e-2
# Ops whose 16-bit inputs run other kernels than fp32 on a GPU (the tensor-core forms), checked in 16 bits there too,
# at these token counts: 3 (G formed on chip on the CUDA cores) and 12 (more than a formed tile holds: G
# materialised, or formed on the tensor cores where `_blocks.PAIRWISE_MMA_FORMED_GPU_BLOCKS` turns that on).
_SIXTEEN_BIT_OPS = {"score_pairwise": (3, 12)}


def _inputs(device, tokens: int = 3):
    gen = torch.Generator().manual_seed(1234)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device)

    n, t, i, o, q = 5, tokens, 7, 6, 4
    a, g, v = rnd(n, t, i), rnd(n, t, o), rnd(q, o, i)
    q_a = torch.linalg.qr(torch.randn(i, i, generator=gen, dtype=torch.float64))[0].float().to(device)
    q_s = torch.linalg.qr(torch.randn(o, o, generator=gen, dtype=torch.float64))[0].float().to(device)
    lam = rnd(o, i).abs()
    return a, g, v, q_a, q_s, lam


def run(op: str, fn, device, sixteen_bit: bool | None = None) -> str | None:
    """None, or what went wrong. sixteen_bit (default: for _SIXTEEN_BIT_OPS on a CUDA device) also checks 16-bit
    inputs (`_sixteen_bit_dtype`), whose kernels there are others than fp32's."""
    if sixteen_bit is None:
        sixteen_bit = torch.device(device).type == "cuda" and op in _SIXTEEN_BIT_OPS
    error = _run(op, fn, device)
    if error is None and sixteen_bit:
        dtype = _sixteen_bit_dtype(device)
        for tokens in _SIXTEEN_BIT_OPS.get(op, (3,)):
            error = _run(op, fn, device, dtype, tokens)
            if error is not None:
                return f"{str(dtype).replace('torch.', '')} inputs, {tokens} tokens: {error}"
    return error


def _sixteen_bit_dtype(device) -> torch.dtype:
    """bf16, or fp16 on a GPU without bf16 products (before sm_80): a 16-bit dtype the device runs, so a backend
    is not disabled for a dtype its users cannot pass it anyway."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


def _run(op: str, fn, device, dtype: torch.dtype = torch.float32, tokens: int = 3) -> str | None:
    a, g, v, q_a, q_s, lam = _inputs(device, tokens)
    if dtype != torch.float32:  # the activations, gradients and queries; the eigenbases stay fp32
        a, g, v = a.to(dtype), g.to(dtype), v.to(dtype)
    try:
        if op == "covariance":
            x = a.reshape(-1, a.shape[-1])
            got, want = fn(x, None), reference.covariance_ref(x)
        elif op == "lambda_accum":
            got, want = fn(a, g, q_a, q_s), reference.lambda_accum_ref(a, g, q_a, q_s)
        elif op == "kron_project":
            fns = (spectral.accumulation(0.7), spectral.propagation(0.7))
            got = torch.stack(list(fn(v, q_s, q_a, lam, fns)))
            want = torch.stack(list(reference.kron_project_ref(v, q_s, q_a, lam, fns)))
        elif op == "score_pairwise":
            got, want = fn(v, a, g), reference.score_pairwise_ref(v, a, g)
        elif op == "score_self":
            got, want = fn(a, g, q_s, q_a, lam), reference.score_self_ref(a, g, q_s, q_a, lam)
        elif op == "score_lowrank":
            # rank-3 factors as strided views of v (no extra random draws): u [Q, O, 3], w [Q, I, 3]
            u, w = v[:, :, :3], v.transpose(1, 2)[:, :, 3:6]
            got, want = fn(u, w, a, g), reference.score_lowrank_ref(u, w, a, g)
        elif op == "score_per_token":
            got, want = fn(v, a, g), reference.score_per_token_ref(v, a, g)
        else:
            return f"no self-test for op {op!r}"
    except Exception as exc:  # a launch failure is a failed self-test, reported with its message
        return f"raised {exc.__class__.__name__}: {exc}"
    err = (got.double().cpu() - want.cpu()).abs().max().item()
    scale = want.abs().max().item() + 1e-30
    if not err <= (_RTOL if dtype == torch.float32 else _RTOL_16BIT) * scale:
        return f"max error {err:.3g} vs reference scale {scale:.3g} on a tiny case"
    return None
