"""kron_project: f(H) V = Q_S [f(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ for a batch of V (SOURCE_MATH.md §3 step 4)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import spectral
from ._common import compute_dtype


def kron_project_ref(v: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, lam: torch.Tensor,
                     fns: Sequence[spectral.Spectral], *, upcast: bool = True) -> tuple[torch.Tensor, ...]:
    """v: [Q, O, I], q_s: [O, O], q_a: [I, I], lam: [O, I]. Returns one [Q, O, I] per f in fns."""
    dt = compute_dtype(v, upcast)
    qs, qa = q_s.to(dt), q_a.to(dt)
    rotated = qs.T @ v.to(dt) @ qa
    return tuple(qs @ (spectral.evaluate(f, lam.to(dt)) * rotated) @ qa.T for f in fns)
