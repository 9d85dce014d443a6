"""covariance: C = Σ_r m_r x_r x_rᵀ over token rows (SOURCE_MATH.md §7, SYRK)."""
from __future__ import annotations

import torch

from ._common import compute_dtype


def covariance_ref(x: torch.Tensor, mask: torch.Tensor | None = None, *, upcast: bool = True) -> torch.Tensor:
    """x: [R, D] rows; mask: [R] (bool or weights) or None. Returns [D, D] (a sum, not a mean)."""
    dt = compute_dtype(x, upcast)
    xs = x.to(dt)
    if mask is not None:
        xs = xs * mask.to(dt)[:, None]
    return xs.T @ xs if mask is None else xs.T @ x.to(dt)
