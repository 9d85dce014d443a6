"""lambda_accum: Λ = Σ_n (Q_Sᵀ G_n Q_A)², G_n = Σ_t g_{n,t} a_{n,t}ᵀ (SOURCE_MATH.md §3 step 3)."""
from __future__ import annotations

import torch

from ._common import compute_dtype


def lambda_accum_ref(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                     *, upcast: bool = True) -> torch.Tensor:
    """a: [N, T, I], g: [N, T, O], q_a: [I, I], q_s: [O, O]. Returns [O, I] (a sum over n).

    Materialises every per-example gradient: this is the oracle, not the fast path.
    """
    dt = compute_dtype(a, upcast)
    grads = torch.einsum("nto,nti->noi", g.to(dt), a.to(dt))
    rotated = q_s.to(dt).T @ grads @ q_a.to(dt)
    return (rotated * rotated).sum(dim=0)
