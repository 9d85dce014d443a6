"""rank_one_product: left @ (w ⊙ g_q a_qᵀ) for every query: the output-side rotation of one-token influence
directions (W_q = w ⊙ g_q a_qᵀ, w = f(Λ) in the eigenbasis) in the pipeline's "output" scoring plan."""
from __future__ import annotations

import torch

from ._common import compute_dtype


def rank_one_product_ref(left: torch.Tensor, g: torch.Tensor, a: torch.Tensor, weight: torch.Tensor | None = None,
                         *, upcast: bool = True) -> torch.Tensor:
    """left: [P, O], g: [Q, O], a: [Q, I], weight: [O, I] or None (ones). Returns [Q, P, I]."""
    dt = compute_dtype(left, upcast)
    w = g.to(dt)[:, :, None] * a.to(dt)[:, None, :]
    if weight is not None:
        w = w * weight.to(dt)
    return left.to(dt) @ w
