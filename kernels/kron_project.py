"""kron_project: Kronecker eigen-projection f(H) V = Q_S [f(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ for a batch of V.

Math (SOURCE_MATH.md §3 step 4): v [Q, O, I], Q_S [O, O], Q_A [I, I], Λ [O, I] ≥ 0 (clamped at 0),
one output [Q, O, I] per spectral function f (source_fast/spectral.py). Four batched GEMMs of
`_common.bmm`, all fp32 (IEEE, no TF32) whatever the input dtype:

    1. T = Q_Sᵀ V_q                 (shared by every f)
    2. R = T Q_A                    (shared by every f: the rotation is done once)
    3. U = Q_S (f(Λ) ⊙ R)           f evaluated on chip from (kind, c, damping) in the prologue of the
                                    B operand: no f(Λ) tensor and no extra pass over R
    4. out = U Q_Aᵀ

Cost: Q·(2 + 2·len(fns))·O·I·(O + I)/2 MACs; the transposes are stride swaps, never copies.
`discrete_s`/`discrete_r` ((1 − ησ)^K needs an integer power that Triton has no portable
intrinsic for) are evaluated on the host with `spectral.evaluate` in float64 (in fp32,
1 − (1 − ησ)^K cancels to 0 for ησ ≲ 1e-7) and read as an fp32 table;
`identity` skips the scaling.

Why fp32 throughout, even for fp16 v: this op runs once per query batch (not per training
example), and f(Λ) spans orders of magnitude (an inverse with small damping reaches 1/δ), so an
fp16 operand after the spectral scaling could overflow. Output fp32.
"""
from __future__ import annotations

from typing import Sequence

import torch

from source_fast import spectral

from . import _common


def kron_project_triton(v: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, lam: torch.Tensor,
                        fns: Sequence[spectral.Spectral]) -> tuple[torch.Tensor, ...]:
    """For each f in fns: Q_S [f(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ -> tuple of [Q, O, I] fp32."""
    v = v.contiguous()
    q_s, q_a = q_s.contiguous(), q_a.contiguous()  # eigh returns column-major eigenvectors
    lam = lam.contiguous()
    q, o, i = v.shape
    f32 = torch.float32
    if v.numel() == 0:
        return tuple(torch.zeros(q, o, i, dtype=f32, device=v.device) for _ in fns)
    dot = _common.DOT_F32
    qs, qa = q_s.unsqueeze(0), q_a.unsqueeze(0)
    work = torch.empty(q, o, i, dtype=f32, device=v.device)
    rotated = torch.empty(q, o, i, dtype=f32, device=v.device)
    _common.bmm(qs.mT, v, work, dot=dot)          # Q_Sᵀ V
    _common.bmm(work, qa, rotated, dot=dot)       # (Q_Sᵀ V) Q_A
    results = []
    for spec in fns:
        code = _common.spectral_code(spec)
        table = lam
        if code == _common.F_TABLE:
            # float64 on the host: fp32 (1 − ησ)^K cancels in 1 − (·) for small ησ (discrete_r).
            table = spectral.evaluate(spec, lam.to(torch.float64)).to(f32).contiguous()
        _common.bmm(qs, rotated, work, dot=dot, fkind=code, f=table if code != _common.F_NONE else None,
                    spec_c=spec.c, spec_damping=spec.damping)   # Q_S (f(Λ) ⊙ R)
        out = torch.empty(q, o, i, dtype=f32, device=v.device)
        _common.bmm(work, qa.mT, out, dot=dot)   # (·) Q_Aᵀ
        results.append(out)
    return tuple(results)
