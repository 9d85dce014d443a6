"""Spectral functions f(σ) applied to EK-FAC eigenvalues (SOURCE_MATH.md §2).

Each function is described by a small frozen dataclass, `Spectral`, so that every backend (torch,
Triton epilogue, CUDA epilogue) evaluates exactly the same formula from the same few numbers:

===============  =============================================  =========================
kind             f(σ)                                           value at σ = 0, δ = 0
===============  =============================================  =========================
``identity``     1                                              1
``inverse``      1 / (σ + δ)                                    1/δ (δ > 0 required)
``exp``          exp(−c (σ + δ))           (propagation s)      1
``source_r``     −expm1(−c (σ+δ)) / (σ+δ)  (accumulation r)     c
``discrete_s``   (1 − η (σ+δ))^K           (exact unrolled s)   1
``discrete_r``   (1 − (1 − η (σ+δ))^K) / (σ+δ)  (exact r)       η K
===============  =============================================  =========================

``damping`` δ ≥ 0 shifts σ in every kind but ``identity``: f is evaluated on the curvature H + δ I. SOURCE uses it
twice: as weight decay (an L2 term wd·½‖θ‖² in the training objective adds wd I to the Hessian of the dynamics, so
both r and s of a segment take δ = wd) and as the optional extra damping of r alone (δ = 0 by default, as the paper:
r ≤ min(c, 1/σ) is already bounded).
σ is clamped at 0 before evaluation: corrected eigenvalues are PSD by construction and tiny
negatives are round-off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("identity", "inverse", "exp", "source_r", "discrete_s", "discrete_r")

# Below this c·σ the series of −expm1(−x)/x is used: 1 − x/2 + x²/6 (relative error < x³/24).
_SMALL_X = 1e-6


@dataclass(frozen=True)
class Spectral:
    """f(σ) for one segment. ``c`` is the learning-rate mass Σ η_k (already divided by 1 − β for
    momentum); ``damping`` is δ; ``eta``/``steps`` are used by the discrete (exact-unrolling) forms."""

    kind: str
    c: float = 0.0
    damping: float = 0.0
    eta: float = 0.0
    steps: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Spectral.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("c", "damping", "eta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Spectral.{name} must be a finite number >= 0, got {value!r}")
        if self.kind == "inverse" and self.damping <= 0:
            raise ValueError(
                "Spectral('inverse') needs damping > 0 (a plain inverse of a PSD matrix with zero "
                f"eigenvalues is undefined), got damping={self.damping!r}"
            )
        if self.kind in ("discrete_s", "discrete_r") and (self.steps < 0 or int(self.steps) != self.steps):
            raise ValueError(f"Spectral.steps must be a non-negative integer, got {self.steps!r}")


def identity() -> Spectral:
    return Spectral("identity")


def inverse(damping: float) -> Spectral:
    return Spectral("inverse", damping=float(damping))


def propagation(c: float, damping: float = 0.0) -> Spectral:
    """s(σ) = exp(−c (σ + δ))."""
    return Spectral("exp", c=float(c), damping=float(damping))


def accumulation(c: float, damping: float = 0.0) -> Spectral:
    """r(σ) = (1 − exp(−c (σ + δ))) / (σ + δ) with limit c at σ + δ = 0."""
    return Spectral("source_r", c=float(c), damping=float(damping))


def evaluate(spec: Spectral, sigma: torch.Tensor) -> torch.Tensor:
    """f(σ + δ) elementwise, in σ's dtype (callers pass fp32 or float64). Never NaN for finite σ ≥ 0."""
    kind = spec.kind
    if kind == "identity":
        return torch.ones_like(sigma)
    s = sigma.clamp_min(0) + spec.damping
    if kind == "inverse":
        return 1.0 / s
    if kind == "exp":
        return torch.exp(-spec.c * s)
    if kind == "source_r":
        return _one_minus_exp_over(s, spec.c)
    # Discrete (exact unrolling of K steps with constant η): 1 − ησ may be negative (unstable step).
    x = spec.eta * s
    stable = x < 1
    # For 0 ≤ ησ < 1: base^K = exp(K log1p(−ησ)) and 1 − base^K = −expm1(K log1p(−ησ)): no
    # cancellation near σ = 0. For ησ ≥ 1 the direct form has none to fear.
    log_base = torch.log1p(-torch.where(stable, x, torch.zeros_like(x)))
    powered = torch.where(stable, torch.exp(spec.steps * log_base), (1.0 - x) ** spec.steps)
    if kind == "discrete_s":
        return powered
    one_minus = torch.where(stable, -torch.expm1(spec.steps * log_base), 1.0 - powered)
    # discrete_r = η Σ_{j<K} base^j = (1 − base^K)/σ, with its limit ηK at σ = 0.
    zero = s == 0
    safe = torch.where(zero, torch.ones_like(s), s)
    return torch.where(zero, torch.full_like(s, spec.eta * spec.steps), one_minus / safe)


def _one_minus_exp_over(s: torch.Tensor, c: float) -> torch.Tensor:
    """(1 − exp(−c s)) / s without cancellation or 0/0; equals c at s = 0."""
    if c == 0.0:
        return torch.zeros_like(s)
    x = c * s
    small = x < _SMALL_X
    safe = torch.where(small, torch.ones_like(s), s)
    big = -torch.expm1(-x) / safe
    series = c * (1.0 - x / 2.0 + x * x / 6.0)
    return torch.where(small, series, big)
