"""Public tensor ops of source_fast: validate → select a backend → run.

These are pure functions on tensors (no module hooks), meant to be called directly by other
attribution libraries as well as by source_fast's own pipeline. Shapes, per layer:
N examples, T tokens per example, I inputs (bias column included), O outputs, Q query directions.

Every op has a float64 oracle in source_fast/reference/<op>.py, a Triton kernel in
kernels/<op>.py, CUDA/C++ sources in csrc/<op>/, tests in tests/ops/test_<op>.py and a benchmark
in benchmarks/bench_<op>.py. Accumulation is fp32 for fp16/bf16/fp32 inputs and float64 for
float64 inputs; outputs carry the accumulation dtype.

``backend``: None (auto: cuda → triton → cpu → torch, first that supports the inputs), or one of
"cuda", "triton", "cpu", "torch" (raises NotImplementedError with every backend's reasons if it
cannot run). See `explain`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _config, _dispatch, spectral
from ._validation import check_same_device, check_tensor


def _run(op, tensors, backend, deterministic, *args):
    if deterministic is None:
        deterministic = _config.deterministic_default()
    _, fn = _dispatch.select(op, tensors, backend=backend, deterministic=deterministic)
    return fn(*args)


def covariance(x: torch.Tensor, mask: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
               backend: str | None = None, deterministic: bool | None = None) -> torch.Tensor:
    """Uncentred second moment sum C = Σ_r m_r x_r x_rᵀ (the K-FAC factors A and S).

    Args:
        x: ``[R, D]`` token rows (activations with bias column, or output gradients).
        mask: optional ``[R]`` bool or float row weights (padding tokens → 0).
        out: optional ``[D, D]`` fp32/fp64 accumulator, updated in place (C is added to it).
    Returns:
        ``[D, D]`` symmetric matrix, fp32 (float64 for float64 x).
    Raises:
        TypeError/ValueError on wrong types, shapes, dtypes or devices.
    Example:
        >>> A = covariance(torch.randn(100, 8))  # doctest: +SKIP
    """
    check_tensor("x", x, ndim=2)
    if mask is not None:
        check_tensor("mask", mask, ndim=1, dtypes=None, shape=(x.shape[0],))
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=(torch.float32, torch.float64), shape=(x.shape[1], x.shape[1]))
    check_same_device(x=x, mask=mask, out=out)
    tensors = {"x": x}
    if mask is not None:  # any dtype (backends convert it); its presence picks the measured GPU regime
        tensors["mask"] = mask
    if out is not None:
        tensors["out"] = out
    return _run("covariance", tensors, backend, deterministic, x, mask, out)


def _check_tokens(a, g):
    check_tensor("a", a, ndim=3)
    check_tensor("g", g, ndim=3, shape=(a.shape[0], a.shape[1], None))
    if a.dtype != g.dtype:
        raise TypeError(f"a and g must share a dtype, got a: {a.dtype}, g: {g.dtype}")


def _check_basis(q_a, q_s, i, o):
    check_tensor("q_a", q_a, ndim=2, shape=(i, i))
    check_tensor("q_s", q_s, ndim=2, shape=(o, o))


def lambda_accum(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor, *,
                 out: torch.Tensor | None = None, backend: str | None = None,
                 deterministic: bool | None = None) -> torch.Tensor:
    """EK-FAC eigenvalue correction sum Λ = Σ_n (Q_Sᵀ G_n Q_A)², G_n = Σ_t g_{n,t} a_{n,t}ᵀ.

    Per-example gradients are never materialised as a whole (one token: a single GEMM of squares).

    Args:
        a: ``[N, T, I]`` activations; g: ``[N, T, O]`` output gradients (same dtype).
        q_a: ``[I, I]``, q_s: ``[O, O]`` eigenvector matrices (columns are eigenvectors).
        out: optional ``[O, I]`` accumulator updated in place.
    Returns:
        ``[O, I]`` (a sum over examples; divide by N for the mean).
    """
    _check_tokens(a, g)
    _check_basis(q_a, q_s, a.shape[2], g.shape[2])
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=(torch.float32, torch.float64), shape=(g.shape[2], a.shape[2]))
    check_same_device(a=a, g=g, q_a=q_a, q_s=q_s, out=out)
    tensors = {"a": a, "g": g, "q_a": q_a, "q_s": q_s}
    if out is not None:  # a float64 accumulator must reach a backend that accumulates in float64
        tensors["out"] = out
    return _run("lambda_accum", tensors, backend, deterministic, a, g, q_a, q_s, *([out] if out is not None else []))


def kron_project(v: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, lam: torch.Tensor,
                 fns: Sequence[spectral.Spectral] | spectral.Spectral, *, backend: str | None = None,
                 deterministic: bool | None = None):
    """Kronecker eigen-projection f(H) V = Q_S [f(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ for a batch of V.

    Several spectral functions share one rotation (the query walk needs r and s of a segment).

    Args:
        v: ``[Q, O, I]`` directions in the layer's gradient layout (weight ``[O, I]``, bias last column).
        q_s: ``[O, O]``, q_a: ``[I, I]`` eigenvectors; lam: ``[O, I]`` corrected eigenvalues (≥ 0).
        fns: one `spectral.Spectral` or a sequence of them.
    Returns:
        one ``[Q, O, I]`` tensor per function (a tuple when fns is a sequence).
    """
    single = isinstance(fns, spectral.Spectral)
    fn_list = (fns,) if single else tuple(fns)
    if not fn_list or not all(isinstance(f, spectral.Spectral) for f in fn_list):
        raise TypeError(f"fns must be a Spectral or a non-empty sequence of Spectral, got {fns!r}")
    check_tensor("v", v, ndim=3)
    _check_basis(q_a, q_s, v.shape[2], v.shape[1])
    check_tensor("lam", lam, ndim=2, shape=(v.shape[1], v.shape[2]))
    check_same_device(v=v, q_s=q_s, q_a=q_a, lam=lam)
    tensors = {"v": v, "q_s": q_s, "q_a": q_a, "lam": lam}
    result = _run("kron_project", tensors, backend, deterministic, v, q_s, q_a, lam, fn_list)
    return result[0] if single else tuple(result)


def score_pairwise(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, *, backend: str | None = None,
                   deterministic: bool | None = None) -> torch.Tensor:
    """scores[q, n] = ⟨V_q, G_n⟩ = Σ_t g_{n,t}ᵀ V_q a_{n,t}, without materialising all G_n.

    Args:
        v: ``[Q, O, I]`` preconditioned query directions; a: ``[N, T, I]``; g: ``[N, T, O]``.
    Returns:
        ``[Q, N]`` fp32 (float64 for float64 inputs).
    """
    _check_tokens(a, g)
    check_tensor("v", v, ndim=3, shape=(None, g.shape[2], a.shape[2]))
    check_same_device(v=v, a=a, g=g)
    return _run("score_pairwise", {"v": v, "a": a, "g": g}, backend, deterministic, v, a, g)


def score_self(a: torch.Tensor, g: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, weights: torch.Tensor, *,
               backend: str | None = None, deterministic: bool | None = None) -> torch.Tensor:
    """Self-influence of one EK-FAC operator: s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij = ⟨G_n, f(H) G_n⟩
    with W = f(Λ).

    Args:
        a: ``[N, T, I]``; g: ``[N, T, O]``; q_s: ``[O, O]``; q_a: ``[I, I]``; weights: ``[O, I]``.
    Returns:
        ``[N]``.
    """
    _check_tokens(a, g)
    _check_basis(q_a, q_s, a.shape[2], g.shape[2])
    check_tensor("weights", weights, ndim=2, shape=(g.shape[2], a.shape[2]))
    check_same_device(a=a, g=g, q_s=q_s, q_a=q_a, weights=weights)
    tensors = {"a": a, "g": g, "q_s": q_s, "q_a": q_a, "weights": weights}
    return _run("score_self", tensors, backend, deterministic, a, g, q_s, q_a, weights)


def score_lowrank(u: torch.Tensor, w: torch.Tensor, a: torch.Tensor, g: torch.Tensor, *, backend: str | None = None,
                  deterministic: bool | None = None) -> torch.Tensor:
    """Scores for low-rank query directions V_q = U_q W_qᵀ without forming V_q or G_n:
    scores[q, n] = ⟨U_q W_qᵀ, G_n⟩ = Σ_t Σ_r (U_qᵀ g_{n,t})_r (W_qᵀ a_{n,t})_r.

    Q·N·T·R·(O + I) multiply-adds instead of ≥ Q·N·O·I for dense directions.

    Args:
        u: ``[Q, O, R]``; w: ``[Q, I, R]``; a: ``[N, T, I]``; g: ``[N, T, O]`` (a and g share a dtype).
    Returns:
        ``[Q, N]`` fp32 (float64 for float64 inputs).
    Raises:
        TypeError/ValueError on wrong types, shapes, dtypes or devices.
    Example:
        >>> s = score_lowrank(torch.randn(2, 6, 3), torch.randn(2, 9, 3), torch.randn(5, 4, 9),
        ...                   torch.randn(5, 4, 6))  # doctest: +SKIP
    """
    _check_tokens(a, g)
    check_tensor("u", u, ndim=3, shape=(None, g.shape[2], None))
    check_tensor("w", w, ndim=3, shape=(u.shape[0], a.shape[2], u.shape[2]))
    check_same_device(u=u, w=w, a=a, g=g)
    return _run("score_lowrank", {"u": u, "w": w, "a": a, "g": g}, backend, deterministic, u, w, a, g)


def score_per_token(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, *, backend: str | None = None,
                    deterministic: bool | None = None) -> torch.Tensor:
    """Per-token contributions out[q, n, t] = g_{n,t}ᵀ V_q a_{n,t} to score_pairwise (their sum over t).

    Args:
        v: ``[Q, O, I]`` query directions; a: ``[N, T, I]``; g: ``[N, T, O]`` (a and g share a dtype).
    Returns:
        ``[Q, N, T]`` fp32 (float64 for float64 inputs).
    Raises:
        TypeError/ValueError on wrong types, shapes, dtypes or devices.
    Example:
        >>> s = score_per_token(torch.randn(2, 6, 9), torch.randn(5, 4, 9), torch.randn(5, 4, 6))  # doctest: +SKIP
    """
    _check_tokens(a, g)
    check_tensor("v", v, ndim=3, shape=(None, g.shape[2], a.shape[2]))
    check_same_device(v=v, a=a, g=g)
    return _run("score_per_token", {"v": v, "a": a, "g": g}, backend, deterministic, v, a, g)


def topk_update(values: torch.Tensor | None, indices: torch.Tensor | None, new_scores: torch.Tensor, offset: int,
                k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming top-k over training examples: merge a block of scores ``[Q, n_block]`` whose first
    column is training index ``offset`` into running (values, indices) ``[Q, ≤k]``. Ties keep the
    lower training index (stable), so the result does not depend on the block size."""
    check_tensor("new_scores", new_scores, ndim=2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    block_idx = torch.arange(offset, offset + new_scores.shape[1], device=new_scores.device)
    block_idx = block_idx.expand(new_scores.shape[0], -1)
    if values is None:
        cand_v, cand_i = new_scores, block_idx
    else:
        cand_v = torch.cat([values, new_scores.to(values.dtype)], 1)
        cand_i = torch.cat([indices, block_idx], 1)
    # Sort by index first, then a stable sort by value keeps lower indices first among ties.
    order = torch.argsort(cand_i, dim=1, stable=True)
    cand_v, cand_i = cand_v.gather(1, order), cand_i.gather(1, order)
    order = torch.argsort(cand_v, dim=1, descending=largest, stable=True)[:, :k]
    return cand_v.gather(1, order), cand_i.gather(1, order)


def explain(op: str, *args, deterministic: bool = False, **named) -> str:
    """Why is (or isn't) each backend used for `op` on these inputs? Returns a printable table.

    Pass the op's tensors positionally in the op's order, or by name, e.g.
    ``explain("score_pairwise", v, a, g)``.
    """
    names = {
        "covariance": ("x", "mask"),
        "lambda_accum": ("a", "g", "q_a", "q_s"),
        "kron_project": ("v", "q_s", "q_a", "lam"),
        "score_pairwise": ("v", "a", "g"),
        "score_self": ("a", "g", "q_s", "q_a", "weights"),
        "score_lowrank": ("u", "w", "a", "g"),
        "score_per_token": ("v", "a", "g"),
    }
    if op not in names:
        raise ValueError(f"op must be one of {tuple(names)}, got {op!r}")
    tensors = dict(zip(names[op], args))
    tensors.update(named)
    tensors = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    return _dispatch.explain(op, tensors, deterministic=deterministic)
