"""One comparison function for every numerical test: `assert_close_report`.

After Liger's `assert_verbose_allclose` (mismatch count, NaN/±Inf parity, first bad indices) and
gsplat's aggregate guards (relative L2, cosine, signed bias), so that neither a few outliers nor a
small systematic bias can hide behind an elementwise tolerance. A failure prints every metric.
"""
from __future__ import annotations

import math

import torch

_SHOW = 5  # first bad indices listed


def _metrics(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    a = actual.detach().to(torch.float64).cpu().reshape(-1)
    e = expected.detach().to(torch.float64).cpu().reshape(-1)
    finite = torch.isfinite(a) & torch.isfinite(e)
    diff = (a - e).where(finite, torch.zeros_like(a))
    ref = e.where(finite, torch.zeros_like(e))
    abs_err = diff.abs()
    ref_abs = ref.abs()
    norm_ref = float(ref.norm())
    norm_act = float(a.where(finite, torch.zeros_like(a)).norm())
    sum_ref_abs = float(ref_abs.sum())
    cos = float((a.where(finite, torch.zeros_like(a)) * ref).sum() / (norm_act * norm_ref)) \
        if norm_act > 0 and norm_ref > 0 else (1.0 if norm_act == norm_ref else 0.0)
    return {
        "a": a, "e": e, "finite": finite, "abs_err": abs_err, "ref_abs": ref_abs,
        "max_abs": float(abs_err.max()) if abs_err.numel() else 0.0,
        "max_rel": float((abs_err / ref_abs.clamp_min(1e-300)).where(ref_abs > 0, abs_err * math.inf).nan_to_num(
            nan=0.0).max()) if abs_err.numel() else 0.0,
        "rel_l2": float(diff.norm()) / norm_ref if norm_ref > 0 else (0.0 if float(diff.norm()) == 0 else math.inf),
        "cosine": cos,
        "bias": abs(float(diff.sum())) / sum_ref_abs if sum_ref_abs > 0 else (0.0 if float(diff.sum()) == 0 else math.inf),
        "max_ref": float(ref_abs.max()) if ref_abs.numel() else 0.0,
        "rms_ref": norm_ref / math.sqrt(max(ref.numel(), 1)),
    }


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                        name: str = "tensor", max_rel_l2: float | None = None, max_bias: float | None = None,
                        min_cosine: float | None = None) -> dict:
    """Raise AssertionError unless |actual − expected| ≤ atol + rtol·|expected| everywhere, NaN/±Inf
    appear at the same places with the same signs, and the aggregate guards hold.

    Guards default to eps = max(rtol, atol / rms(expected)) — the tolerance expressed relative to
    the typical magnitude: relative L2 ≤ eps, signed bias |ΣΔ| / Σ|expected| ≤ eps, 1 − cosine ≤ eps.
    Errors that pass elementwise only by sitting at the limit everywhere, or all in one direction,
    fail a guard. Returns the metrics (for logging observed errors).
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    m = _metrics(actual, expected)
    a, e = m["a"], m["e"]
    problems = []
    # NaN / ±Inf parity
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        bad = (nan_a != nan_e).nonzero().reshape(-1)
        problems.append(f"NaN parity differs at {bad.numel()} positions (actual NaN: {int(nan_a.sum())}, "
                        f"expected NaN: {int(nan_e.sum())}), first flat indices {bad[:_SHOW].tolist()}")
    inf_a = torch.isinf(a) * torch.sign(a)
    inf_e = torch.isinf(e) * torch.sign(e)
    if not torch.equal(inf_a.nan_to_num(0.0), inf_e.nan_to_num(0.0)):
        bad = (inf_a.nan_to_num(0.0) != inf_e.nan_to_num(0.0)).nonzero().reshape(-1)
        problems.append(f"±Inf parity differs at {bad.numel()} positions, first flat indices {bad[:_SHOW].tolist()}")
    # elementwise
    allowed = atol + rtol * m["ref_abs"]
    bad_mask = (m["abs_err"] > allowed) & m["finite"]
    n_bad = int(bad_mask.sum())
    if n_bad:
        flat = bad_mask.nonzero().reshape(-1)[:_SHOW]
        idx = [tuple(int(i) for i in torch.unravel_index(f, tuple(expected.shape))) if expected.dim() else ()
               for f in flat]
        pairs = ", ".join(f"{ix}: {a[f].item():.6g} vs {e[f].item():.6g}" for ix, f in zip(idx, flat))
        problems.append(f"{n_bad}/{a.numel()} elements exceed atol={atol:.3g} + rtol={rtol:.3g}·|expected|; "
                        f"first: {pairs}")
    # aggregate guards
    eps = max(rtol, atol / m["rms_ref"]) if m["rms_ref"] > 0 else math.inf
    lim_l2 = eps if max_rel_l2 is None else max_rel_l2
    lim_bias = eps if max_bias is None else max_bias
    lim_cos = 1.0 - eps if min_cosine is None else min_cosine
    if m["rel_l2"] > lim_l2:
        problems.append(f"relative L2 error {m['rel_l2']:.3g} > {lim_l2:.3g}")
    if m["bias"] > lim_bias:
        problems.append(f"signed bias |ΣΔ|/Σ|ref| {m['bias']:.3g} > {lim_bias:.3g}")
    if m["cosine"] < lim_cos:
        problems.append(f"cosine {m['cosine']:.9f} < {lim_cos:.9f}")
    if problems:
        summary = (f"max abs err {m['max_abs']:.3g}, max rel err {m['max_rel']:.3g}, rel L2 {m['rel_l2']:.3g}, "
                   f"cosine {m['cosine']:.9f}, signed bias {m['bias']:.3g}, max|ref| {m['max_ref']:.3g}, "
                   f"shape {tuple(expected.shape)}, dtype {actual.dtype} vs {expected.dtype}")
        raise AssertionError(f"{name}: " + "; ".join(problems) + f"\n  [{summary}]")
    return {k: v for k, v in m.items() if not isinstance(v, torch.Tensor)}
