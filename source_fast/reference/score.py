"""score: inner products of per-example gradients with query directions (SOURCE_MATH.md §7)."""
from __future__ import annotations

import torch

from ._common import compute_dtype


def per_example_grads_ref(a: torch.Tensor, g: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
    """a: [N, T, I], g: [N, T, O] -> G: [N, O, I], G_n = Σ_t g_{n,t} a_{n,t}ᵀ."""
    dt = compute_dtype(a, upcast)
    return torch.einsum("nto,nti->noi", g.to(dt), a.to(dt))


def score_pairwise_ref(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
    """v: [Q, O, I], a: [N, T, I], g: [N, T, O] -> scores [Q, N], scores[q, n] = ⟨V_q, G_n⟩."""
    dt = compute_dtype(a, upcast)
    grads = per_example_grads_ref(a, g, upcast=upcast)
    return torch.einsum("qoi,noi->qn", v.to(dt), grads)


def score_self_ref(a: torch.Tensor, g: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, weights: torch.Tensor,
                   *, upcast: bool = True) -> torch.Tensor:
    """Self-influence of one operator in its eigenbasis: s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij -> [N]."""
    dt = compute_dtype(a, upcast)
    grads = per_example_grads_ref(a, g, upcast=upcast)
    rotated = q_s.to(dt).T @ grads @ q_a.to(dt)
    return torch.einsum("oi,noi->n", weights.to(dt), rotated * rotated)


def score_lowrank_ref(u: torch.Tensor, w: torch.Tensor, a: torch.Tensor, g: torch.Tensor, *,
                      upcast: bool = True) -> torch.Tensor:
    """Low-rank queries V_q = U_q W_qᵀ (u: [Q, O, R], w: [Q, I, R]) -> scores [Q, N]."""
    dt = compute_dtype(a, upcast)
    v = torch.einsum("qor,qir->qoi", u.to(dt), w.to(dt))
    return score_pairwise_ref(v, a, g, upcast=upcast)


def score_per_token_ref(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
    """Per-token scores [Q, N, T]: g_{n,t}ᵀ V_q a_{n,t} (their sum over t is score_pairwise)."""
    dt = compute_dtype(a, upcast)
    return torch.einsum("nto,qoi,nti->qnt", g.to(dt), v.to(dt), a.to(dt))
