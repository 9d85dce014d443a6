"""to_queries_innermost: x ⊙ r (the walk's accumulation term W = r(Λ) ⊙ ũ); the layout it is written in does
not change the values."""
from __future__ import annotations

import torch

from ._common import compute_dtype


def to_queries_innermost_ref(x: torch.Tensor, r: torch.Tensor | None = None, *, upcast: bool = True) -> torch.Tensor:
    """x: [Q, O, I], r: [O, I] or None (ones). Returns [Q, O, I]."""
    dt = compute_dtype(x, upcast)
    return x.to(dt) if r is None else x.to(dt) * r.to(dt)
