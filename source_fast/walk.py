"""The SOURCE query walk (SOURCE_MATH.md §2), on precomputed EK-FAC blocks.

For a query direction u_L (per layer, [Q, O, I]) and segments ℓ = L..1:
    v_ℓ = r_ℓ(H̄_ℓ) u_ℓ        (accumulation: what segment ℓ's gradients are scored against)
    u_{ℓ−1} = s_ℓ(H̄_ℓ) u_ℓ    (propagation to earlier segments)
Both come from one rotation per segment and layer (ops.kron_project with two spectral functions).

Adam variant (§4, an approximation): with p̄ the segment-averaged preconditioner and
E = exp(−c p̄ ⊙ diag H̄) elementwise in parameter space,
    v_ℓ = (H̄ + δ I)⁻¹ ((1 − E) ⊙ u_ℓ),   u_{ℓ−1} = E ⊙ u_ℓ.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import ops, spectral
from .ekfac import EKFACBlock

LayerTensors = dict[str, torch.Tensor]


def query_walk(u: LayerTensors, blocks: Sequence[dict[str, EKFACBlock]],
               operators: Sequence[tuple[spectral.Spectral, spectral.Spectral]], *,
               adam: Sequence[dict[str, torch.Tensor] | None] | None = None,
               adam_damping: Sequence[dict[str, float]] | None = None,
               backend: str | None = None) -> list[LayerTensors]:
    """Walk u back through segments (given in training order). Returns v_ℓ per segment, training order.

    Args:
        u: per layer, query directions ``[Q, O, I]`` at the final model.
        blocks: per segment, per layer EK-FAC block.
        operators: per segment, (r, s) spectral functions.
        adam: per segment, per layer p̄ ``[O, I]`` (None for SGD segments).
        adam_damping: per segment, per layer δ of the Adam accumulation inverse.
    """
    if not (len(blocks) == len(operators)):
        raise ValueError(f"blocks and operators must have one entry per segment, got {len(blocks)} and "
                         f"{len(operators)}")
    current = dict(u)
    out: list[LayerTensors] = [dict() for _ in blocks]
    for seg in reversed(range(len(blocks))):
        r, s = operators[seg]
        p_bar = adam[seg] if adam is not None else None
        for name, direction in current.items():
            block = blocks[seg][name]
            if p_bar is None:
                v, nxt = ops.kron_project(direction, block.q_s, block.q_a, block.lam, (r, s), backend=backend)
            else:
                decay = torch.exp(-s.c * p_bar[name].to(direction.dtype) * block.diagonal().clamp_min(0).to(
                    direction.dtype))
                damping = adam_damping[seg][name]
                v = ops.kron_project((1 - decay) * direction, block.q_s, block.q_a, block.lam,
                                     spectral.inverse(damping), backend=backend)
                nxt = decay * direction
            out[seg][name] = v
            current[name] = nxt.to(direction.dtype)
    return out


def rotate_in(v: torch.Tensor, block: EKFACBlock) -> torch.Tensor:
    """Q_Sᵀ V Q_A for a batch V [Q, O, I]: one large GEMM (batch folded into the rows), one batched."""
    q, o, i = v.shape
    right = (v.reshape(q * o, i) @ block.q_a.to(v.dtype)).reshape(q, o, i)
    return torch.matmul(block.q_s.T.to(v.dtype), right)


def change_basis(x: torch.Tensor, src: EKFACBlock, dst: EKFACBlock) -> torch.Tensor:
    """A batch X [Q, O, I] given in src's eigenbasis, expressed in dst's: (Q_S'ᵀ Q_S) X (Q_Aᵀ Q_A')."""
    m_s = (dst.q_s.T @ src.q_s).to(x.dtype)
    m_a = (src.q_a.T @ dst.q_a).to(x.dtype)
    return rotate_in(x, EKFACBlock(m_a, m_s.T, src.lam))


def rotated_walk(u_rot: LayerTensors, blocks: Sequence[dict[str, EKFACBlock]],
                 operators: Sequence[tuple[spectral.Spectral, spectral.Spectral]]) -> list[LayerTensors]:
    """The query walk without leaving the eigenbases (SGD segments).

    u_rot: per layer, the query directions already rotated into the *last* segment's basis.
    Returns per segment (training order) W_ℓ = r_ℓ(Λ_ℓ) ⊙ ũ_ℓ in segment ℓ's basis, so that
    ⟨v_ℓ, G⟩ = ⟨W_ℓ, Q_Sᵀ G Q_A⟩: scoring against training rows rotated by that basis (cheap:
    a Q_A and g Q_S) replaces rotating every v_ℓ back. ũ moves between bases with one cross-basis
    product per boundary, so a walk over L segments costs L − 1 two-sided products, not 3L.
    """
    out: list[LayerTensors] = [dict() for _ in blocks]
    for name, current in u_rot.items():
        for seg in reversed(range(len(blocks))):
            block = blocks[seg][name]
            r, s = operators[seg]
            lam = block.lam.to(current.dtype)
            out[seg][name] = spectral.evaluate(r, lam) * current
            if seg > 0:
                current = change_basis(spectral.evaluate(s, lam) * current, block, blocks[seg - 1][name])
    return out
