"""Curvature diagnostics: which regime SOURCE is in, per layer and segment (SOURCE_MATH.md §2).

Per eigen-direction of a segment's EK-FAC block (corrected eigenvalue σ of Λ̄_ℓ), SOURCE applies

    r(σ) = (1 − exp(−c σ)) / σ        s(σ) = exp(−c σ)        (c = c_ℓ, the segment's lr mass)

and the product c·σ decides what that amounts to:

- c·σ ≪ 1 ("TracIn-like"): r ≈ c, s ≈ 1. The direction is barely trained in this segment; SOURCE
  weighs it like an lr-weighted gradient dot product (TracIn) and propagates it unchanged.
- c·σ ≫ 1 ("influence-like"): r ≈ 1/σ, s ≈ 0. The direction has converged within the segment;
  SOURCE inverts the curvature there (influence function) and earlier segments are forgotten.
- in between: neither limit holds; this is where SOURCE differs from both baselines.

`curvature_report` gives, per (segment, layer), the eigenvalue spectrum and the share of directions
in each regime (thresholds ``low = 0.1`` and ``high = 10`` by default); `format_report` prints it as
a table and `plot_report` draws the spectra and shares into a PNG.

    analyzer.fit(train_dataset)
    rows = curvature_report(analyzer)
    print(format_report(rows))
    plot_report(rows, "curvature.png")

The eigenvalues are those of the curvature of the loss the optimiser stepped on (Λ̄ already carries
``run.loss_scale``), so c·σ is on the scale the operators use. A run with weight decay has its operators
evaluated on σ + wd (SGD runs: the decay's diagonal in each eigenbasis), so the regimes count c·(σ + wd); the
spectrum columns stay Λ̄'s. On Adam runs the walk's exponent is c·p̄ ⊙ diag H̄ per parameter (SOURCE_MATH §4), so
the regimes count those (p̄ = 1/(sqrt(v̂) + eps) is typically 10³–10⁵: c·σ alone would call every direction
TracIn-like). For ``method="influence"`` the
analyzer has one block set at the final model; it is reported as one segment with c = Σ_ℓ c_ℓ (the
mass behind ``damping="source"``).
"""
from __future__ import annotations

import io as _io
import math
import os
from typing import Any, Sequence

import numpy as np

from . import io

__all__ = ["curvature_report", "format_report", "plot_report"]

_REGIMES = ("tracin_like", "intermediate", "influence_like")


def _segment_info(analyzer) -> list[tuple[float, int, int]]:
    """(c, num_steps, stage) of every block set in ``analyzer.blocks`` (training order)."""
    run = analyzer.run
    if getattr(analyzer, "method", None) == "influence":
        return [(float(sum(s.c for s in run.segments)), int(run.total_steps), int(run.num_stages - 1))]
    return [(float(s.c), int(s.num_steps), int(s.stage)) for s in run.segments]


def curvature_report(analyzer: Any, *, low: float = 0.1, high: float = 10.0) -> list[dict]:
    """Per (segment, layer) summary of the corrected eigenvalues Λ̄ and of the c·σ regimes.

    Args:
        analyzer: a fitted `SourceAnalyzer` (``analyzer.blocks`` set by ``fit``); methods "source",
            "fast_source" (one block set per segment) or "influence" (one block set, c = Σ c_ℓ).
        low, high: c·σ below ``low`` is "TracIn-like", above ``high`` "influence-like"
            (0 < low < high).

    Returns:
        One dict per (segment, layer), segments in training order and layers in the analyzer's
        order, with keys ``segment``, ``stage``, ``layer``, ``c`` (c_ℓ; times the layer's ``lr_scale``), ``steps`` (updates in the
        segment), ``n_directions`` (O·I entries of Λ̄), ``sigma_max``, ``sigma_mean``,
        ``sigma_median``, ``frac_zero`` (share of σ ≤ 1e-12·σ_max), ``source_damping`` (1/c: the
        damping r implies), ``heuristic_damping`` (0.1·mean σ), ``tracin_like``, ``intermediate``,
        ``influence_like`` (shares of directions, summing to 1), ``low``, ``high`` and ``spectrum``
        (float64 numpy array of σ, descending; used by `plot_report`).

    Raises:
        ValueError: the analyzer is not fitted, is a method without curvature (tracin,
            gradient_dot), or the thresholds are invalid.
    """
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and math.isfinite(low)
            and math.isfinite(high) and 0 < low < high):
        raise ValueError(f"thresholds must satisfy 0 < low < high (finite), got low={low!r}, high={high!r}")
    method = getattr(analyzer, "method", None)
    if method in ("tracin", "gradient_dot"):
        raise ValueError(f"method={method!r} uses no curvature; build the analyzer with method='source', "
                         "'fast_source' or 'influence' to get a curvature report")
    blocks = getattr(analyzer, "blocks", None)
    if not blocks:
        raise ValueError("the analyzer has no curvature yet: call analyzer.fit(train_dataset) first")
    info = _segment_info(analyzer)
    if len(info) != len(blocks):
        raise ValueError(f"analyzer.blocks has {len(blocks)} segments but its run has {len(info)}; was the run "
                         "replaced after fit()?")
    rows = []
    adam = method != "influence" and analyzer.run.is_adam
    # The operators' argument: Λ̄ + the weight decay's eigen-diagonal (SOURCE on SGD runs; `_decayed`); on Adam
    # runs the exponent's rate p̄ ⊙ diag H̄ (+ the decay's), elementwise in parameter space (`_adam_terms`).
    decayed = getattr(analyzer, "_decayed", None) if method != "influence" and not adam else None
    pbars, _, decay_rates = analyzer._adam_terms() if adam else (None, None, None)
    # A layer trained at its own rate (`TrainingRun.lr_scale`) has its own mass: ratio × c_ℓ.
    scales = analyzer._lr_scales() if method != "influence" and analyzer.run.has_lr_scale else {}
    for seg, (seg_blocks, (segment_c, steps, stage)) in enumerate(zip(blocks, info)):
        operated = decayed(seg_blocks) if decayed is not None else seg_blocks
        for name, block in seg_blocks.items():
            c = segment_c * scales.get(name, 1.0)
            sigma = block.lam.detach().double().cpu().reshape(-1).clamp_min(0).numpy()
            spectrum = np.sort(sigma)[::-1]
            if adam:
                rate = pbars[seg][name].double().cpu() * block.diagonal().double().cpu().clamp_min(0)
                if decay_rates is not None:
                    rate = rate + decay_rates[seg][name][0].double().cpu()
                x = c * rate.reshape(-1).numpy()
            else:
                x = c * operated[name].lam.detach().double().cpu().reshape(-1).clamp_min(0).numpy()
            n = sigma.size
            tracin = float(np.count_nonzero(x < low)) / n
            influence = float(np.count_nonzero(x > high)) / n
            top = float(spectrum[0]) if n else 0.0
            rows.append({
                "segment": seg,
                "stage": stage,
                "layer": name,
                "c": c,
                "steps": steps,
                "n_directions": int(n),
                "sigma_max": top,
                "sigma_mean": float(sigma.mean()),
                "sigma_median": float(np.median(sigma)),
                "frac_zero": float(np.count_nonzero(sigma <= 1e-12 * top)) / n if top > 0 else 1.0,
                "source_damping": 1.0 / c if c > 0 else math.inf,
                "heuristic_damping": 0.1 * float(sigma.mean()),
                "tracin_like": tracin,
                "intermediate": 1.0 - tracin - influence,
                "influence_like": influence,
                "low": float(low),
                "high": float(high),
                "spectrum": spectrum,
            })
    return rows


def _pct(value: float) -> str:
    return f"{100.0 * value:5.1f}%"


def format_report(rows: Sequence[dict]) -> str:
    """The report as a fixed-width text table (one line per segment × layer)."""
    if not rows:
        return "(empty curvature report)"
    low, high = rows[0]["low"], rows[0]["high"]
    header = (f"{'seg':>3} {'stage':>5} {'layer':<14} {'c':>9} {'steps':>6} {'dirs':>7} {'σ_max':>9} {'σ_mean':>9} "
              f"{'σ_median':>9} {'1/c':>9} {'cσ<' + format(low, 'g'):>8} {'between':>8} {'cσ>' + format(high, 'g'):>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['segment']:>3} {r['stage']:>5} {str(r['layer'])[:14]:<14} {r['c']:>9.3g} {r['steps']:>6} "
                     f"{r['n_directions']:>7} {r['sigma_max']:>9.3g} {r['sigma_mean']:>9.3g} {r['sigma_median']:>9.3g} "
                     f"{r['source_damping']:>9.3g} {_pct(r['tracin_like']):>8} {_pct(r['intermediate']):>8} "
                     f"{_pct(r['influence_like']):>8}")
    lines.append(f"shares of eigen-directions: cσ<{low:g} TracIn-like (r≈c, s≈1), cσ>{high:g} influence-like "
                 "(r≈1/σ, s≈0); c = segment lr mass (÷(1−β) with momentum)")
    return "\n".join(lines)


def plot_report(rows_or_analyzer: Any, path: str | os.PathLike, *, title: str | None = None) -> str:
    """Write a PNG: left, c·σ spectra per (segment, layer) with the regime thresholds; right, the
    share of directions in each regime. Accepts rows from `curvature_report` or a fitted analyzer.
    The file is written atomically (`source_fast.io.atomic_write_bytes`). Returns the path."""
    rows = rows_or_analyzer if isinstance(rows_or_analyzer, (list, tuple)) else curvature_report(rows_or_analyzer)
    if not rows:
        raise ValueError("nothing to plot: the curvature report is empty")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = rows[0]["low"], rows[0]["high"]
    labels = [f"seg {r['segment']} · layer {r['layer']}" for r in rows]
    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 3.5))
    cmap = plt.get_cmap("tab10")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    segments = sorted({r["segment"] for r in rows})
    styles = ["-", "--", ":", "-."]
    floor = low * 1e-4  # tiny and zero eigenvalues (round-off of a PSD factor) are drawn here
    for r in rows:
        x = r["c"] * r["spectrum"]
        ax_s.plot(np.arange(1, x.size + 1) / x.size, np.maximum(x, floor),
                  color=cmap(layers.index(r["layer"]) % 10), linestyle=styles[segments.index(r["segment"]) % 4],
                  label=f"seg {r['segment']} (c={r['c']:.3g}) {r['layer']}")
    ax_s.axhline(low, color="gray", lw=0.8)
    ax_s.axhline(high, color="gray", lw=0.8)
    ax_s.set_yscale("log")
    ax_s.set_xlabel("eigen-direction rank / number of directions")
    ax_s.set_ylabel("c·σ (corrected EK-FAC eigenvalue × segment lr mass)")
    ax_s.set_ylim(bottom=floor / 2)
    ax_s.set_title(f"spectra (values below {floor:.0e} drawn at {floor:.0e})")
    ax_s.legend(fontsize=7, loc="upper right")
    y = np.arange(len(rows))[::-1]
    left = np.zeros(len(rows))
    colors = {"tracin_like": "tab:blue", "intermediate": "tab:gray", "influence_like": "tab:red"}
    names = {"tracin_like": f"cσ<{low:g} TracIn-like", "intermediate": "between",
             "influence_like": f"cσ>{high:g} influence-like"}
    for key in _REGIMES:
        values = np.array([r[key] for r in rows])
        ax_b.barh(y, values, left=left, color=colors[key], label=names[key])
        left += values
    ax_b.set_yticks(y)
    ax_b.set_yticklabels(labels, fontsize=8)
    ax_b.set_xlim(0, 1)
    ax_b.set_xlabel("share of eigen-directions")
    ax_b.legend(fontsize=7, loc="lower right")
    ax_b.set_title("regime per segment and layer")
    fig.suptitle(title or "SOURCE curvature diagnostics", fontsize=10)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    io.atomic_write_bytes(path, buffer.getvalue())
    return os.fspath(path)
