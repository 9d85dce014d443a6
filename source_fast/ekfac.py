"""EK-FAC curvature per segment (SOURCE_MATH.md §3), as pure functions on accumulated sums.

per checkpoint: A_c = (1/N) Σ_n Σ_t a aᵀ,  S_c = (1/N) Σ_n Σ_t g gᵀ        (ops.covariance)
per segment:    A̅, S̅ = mean over its checkpoints → float64 eigh → Q_A, Q_S  (`eigen_basis`)
per checkpoint: Λ_c = loss_scale · (1/N) Σ_n (Q_Sᵀ G_n Q_A)²                 (ops.lambda_accum)
per segment:    Λ̄ = mean_c Λ_c  → `EKFACBlock(q_a, q_s, lam)`

`g` are gradients of the task's per-example negative log-likelihood; the Hessian of the optimiser's
loss (loss_scale × NLL) is loss_scale × Fisher, hence the single factor loss_scale on Λ.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import _linalg, spectral


class CurvatureError(RuntimeError):
    """An eigendecomposition failed or a factor is unusable; names the layer and segment."""


@dataclass
class EKFACBlock:
    """One layer's curvature in one segment: H̄ ≈ (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ."""

    q_a: torch.Tensor  # [I, I], columns are eigenvectors of A̅
    q_s: torch.Tensor  # [O, O], columns are eigenvectors of S̅
    lam: torch.Tensor  # [O, I], corrected eigenvalues (≥ 0)

    def to(self, device=None, dtype=None) -> "EKFACBlock":
        return EKFACBlock(self.q_a.to(device, dtype), self.q_s.to(device, dtype), self.lam.to(device, dtype))

    def diagonal(self) -> torch.Tensor:
        """diag(H̄) in the [O, I] layout: (Q_S∘Q_S) Λ (Q_A∘Q_A)ᵀ."""
        return (self.q_s * self.q_s) @ self.lam @ (self.q_a * self.q_a).T

    def eigen_diagonal(self, d: torch.Tensor) -> torch.Tensor:
        """The diagonal, in this block's eigenbasis, of the parameter-space diagonal matrix diag(vec d), d [O, I]:
        (Q_S∘Q_S)ᵀ d (Q_A∘Q_A) (EK-FAC's projection: exact when diag(d) is diagonal in the eigenbasis, e.g. uniform)."""
        q_s, q_a = self.q_s.to(d.dtype), self.q_a.to(d.dtype)
        return (q_s * q_s).T @ d @ (q_a * q_a)

    def shifted(self, shift: torch.Tensor | float) -> "EKFACBlock":
        """The same eigenbasis with Λ + shift: H̄ + the (eigenbasis-diagonal) matrix `shift` stands for."""
        return EKFACBlock(self.q_a, self.q_s, self.lam + shift)

    def dense(self) -> torch.Tensor:
        """The dense [O·I, O·I] matrix (row-major vec of [O, I]); for tests on small layers only."""
        basis = torch.kron(self.q_s, self.q_a)
        return basis @ torch.diag(self.lam.reshape(-1)) @ basis.T


def _round_off(values: torch.Tensor, matrix: torch.Tensor) -> float:
    """Negative eigenvalues smaller than this are round-off of an fp32-accumulated PSD matrix."""
    return 1e-5 * float(matrix.abs().max()) * max(1.0, matrix.shape[0] ** 0.5) + 1e-30


def eigen_basis(cov: torch.Tensor, *, name: str, segment: int, check_finite: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrise, eigendecompose in float64, clamp eigenvalues at 0. Returns (eigvals, eigvecs)."""
    cov64 = cov.to(torch.float64)
    if check_finite and not bool(torch.isfinite(cov64).all()):
        raise FloatingPointError(f"covariance factor of layer {name!r}, segment {segment} contains NaN/Inf "
                                 "(non-finite activations or gradients in the data?); pass check_finite=False to "
                                 "propagate")
    cov64 = (cov64 + cov64.T) * 0.5
    if not check_finite and not bool(torch.isfinite(cov64).all()):
        nan = torch.full_like(cov64, float("nan"))  # propagate, as asked: every score touching it is NaN
        return nan[0], nan
    try:
        evals, evecs = _linalg.eigh(cov64)
    except torch.linalg.LinAlgError as exc:
        raise CurvatureError(f"eigendecomposition failed for layer {name!r}, segment {segment}, size "
                             f"{tuple(cov.shape)}: {exc}") from exc
    most_negative = float(evals.min()) if evals.numel() else 0.0
    if most_negative < -_round_off(evals, cov64):
        warnings.warn(f"layer {name!r}, segment {segment}: covariance eigenvalue {most_negative:.3g} clamped to 0 "
                      "(larger than round-off: is the factor really PSD?)", RuntimeWarning, stacklevel=2)
    return evals.clamp_min(0), evecs


def clamp_lambda(lam: torch.Tensor, *, name: str, segment: int, check_finite: bool = True) -> torch.Tensor:
    if check_finite and not bool(torch.isfinite(lam).all()):
        raise FloatingPointError(f"corrected eigenvalues Λ of layer {name!r}, segment {segment} contain NaN/Inf; "
                                 "pass check_finite=False to propagate")
    return lam.clamp_min(0)


def source_operators(c: float, *, damping: float = 0.0, operator: str = "continuous", eta: float = 0.0,
                     steps: int = 0, weight_decay: float = 0.0) -> tuple[spectral.Spectral, spectral.Spectral]:
    """(r, s) of a segment. "continuous" = the paper's exponential forms; "discrete" = exact
    unrolling of `steps` SGD steps of size `eta` (for exact checks). `weight_decay` wd: both are evaluated on
    H̄ + wd I (an L2 term in the objective); `damping` δ shifts r alone (the optional extra damping)."""
    if operator == "continuous":
        return spectral.accumulation(c, damping + weight_decay), spectral.propagation(c, weight_decay)
    if operator == "discrete":
        return (spectral.Spectral("discrete_r", eta=eta, steps=steps, damping=weight_decay),
                spectral.Spectral("discrete_s", eta=eta, steps=steps, damping=weight_decay))
    raise ValueError(f"operator must be 'continuous' or 'discrete', got {operator!r}")


def heuristic_damping(lam: torch.Tensor) -> float:
    """Kronfluence's default: 0.1 × mean(Λ); 1.0 for a layer whose Λ is all zero (every sampled gradient zero,
    e.g. a channel group behind a dead ReLU), where 0.1 × mean(Λ) would leave (Λ + δ)⁻¹ undefined: its training
    gradients are zero too, so the value only has to be positive."""
    mean = float(lam.mean())
    return 0.1 * mean if mean > 0 else 1.0
