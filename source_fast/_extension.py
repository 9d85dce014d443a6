"""Torch-side layer of the compiled module `source_fast._C` (the `cpu` and `cuda` backends).

`_C` is torch-free (BUILD_NOTES.md): it takes integer data pointers, sizes, strides in elements,
dtype codes and, for CUDA, the current stream as an integer. This module allocates outputs and
workspaces with torch, normalises layouts and calls it. Each `<op>_cpu` / `<op>_cuda` has the
signature and semantics of `source_fast._torch_ops.<op>`; inputs arrive validated by
`source_fast.ops` (shapes, devices), and dtypes are those the backend declares in `_dispatch.py`.

What runs where:

* ``cpu`` (float32, OpenMP; threads = ``torch.get_num_threads()``; fp16/bf16 inputs upcast to float32):
  - covariance: blocked SYRK (upper triangle only, mirrored), any input strides.
  - lambda_accum / score_self: the rotations g Q_S and a Q_A are torch GEMMs (BLAS wins those);
    the per-example outer product, square and reduction run fused in C++, so the ``[n, O, I]``
    chunk of rotated gradients the torch backend materialises is never written.
  - score_pairwise: the flop model (``_torch_ops.pairwise_strategy``) picks the fused token-wise
    contraction (T = 1, or few queries) or the materialised kernel, which forms rows of G_n for a block
    of examples in cache and contracts them with V (T > 1: sequences, a segment's checkpoints stacked).
  - kron_project: the GEMMs are torch (BLAS); only f(Λ) comes from the module (its fp32
    spectral_eval, shared with the CUDA epilogue). Same speed as the torch backend.
  - score_per_token: score_pairwise's one-token kernels (token-wise, or sparse g) on the token rows: each
    (example, token) row is an example of one token, and the [Q, N·T] scores are the [Q, N, T] output.
  - score_lowrank: two products per chunk on the compiled GEMM (csrc/gemm): the token rows against every query's
    factors at once (g [U_1 … U_Q] and a [W_1 … W_Q]: [rows, Q·R] each), multiplied elementwise and summed over
    ranks and tokens. 1.4-3.0x the torch backend's einsum (MKL) on the Zen 5 host (2026-11-28,
    benchmarks/results/ops_cpu_zen5.md); an earlier form measured 0.73-1.51x on the Zen 4 host (2026-11-26).
* ``cuda`` (float32/float16/bfloat16 inputs, float32 accumulation and outputs): the whole op runs in
  the module's kernels (tiled shared-memory GEMMs for rotations, fused epilogues, split-K partials
  reduced in a fixed order). No float atomics: results are bitwise reproducible run to run.
"""
from __future__ import annotations

import importlib
import math
from typing import Sequence

import torch

from . import _linalg, _torch_ops, spectral

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_KIND_CODES = {"identity": 0, "inverse": 1, "exp": 2, "source_r": 3, "discrete_s": 4, "discrete_r": 5}
_F32 = torch.float32


def _lib():
    return importlib.import_module("source_fast._C")


def _code(t: torch.Tensor) -> int:
    try:
        return _DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {t.dtype} for the compiled extension") from None


_HALF = (torch.float16, torch.bfloat16)


def _require_f32(**tensors: torch.Tensor) -> None:
    """float32 only: for the entry points that hand the tensors to the kernels as they are."""
    for name, t in tensors.items():
        if t is not None and t.dtype != _F32:
            raise TypeError(f"{name}: the cpu backend accepts float32 only, got {t.dtype}")


def _require_cpu_dtype(**tensors: torch.Tensor) -> None:
    """float32, or fp16/bf16 that the caller upcasts (`_f32`, or chunk by chunk)."""
    for name, t in tensors.items():
        if t is not None and t.dtype != _F32 and t.dtype not in _HALF:
            raise TypeError(f"{name}: the cpu backend accepts float32, float16 and bfloat16 (upcast to float32), "
                            f"got {t.dtype}")


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t in float32. The kernels compute in fp32, so fp16/bf16 inputs are upcast (exactly): the numbers of the
    fp32 kernels on the same values, which is also what the torch backend computes for them."""
    return t if t is None or t.dtype == _F32 else t.to(_F32)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _rows_contiguous(t: torch.Tensor) -> bool:
    """Row-major with unit column stride (a leading dimension >= columns is fine)."""
    return t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1) and t.stride(0) >= max(t.shape[1], 1)


def _direct_out(out: torch.Tensor) -> bool:
    """The kernels accumulate into fp32 row-major outputs; anything else gets a temporary added."""
    return out.dtype == _F32 and _rows_contiguous(out)


def _mask_f32(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.to(_F32)


def _spectral_tuple(f: spectral.Spectral) -> tuple[int, float, float, float, int]:
    return (_KIND_CODES[f.kind], float(f.c), float(f.damping), float(f.eta), int(f.steps))


# ----------------------------------------------------------------------------------------- CPU


def covariance_cpu(x: torch.Tensor, mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_r m_r x_r x_rᵀ -> [D, D] fp32; with `out`, out <- (out + outᵀ)/2 + C in place (an out that is
    not fp32 row-major gets the fp32 sum added)."""
    _require_cpu_dtype(x=x)
    x = _f32(x)
    r, d = x.shape
    m = _mask_f32(mask)
    direct = out is None or _direct_out(out)
    target = torch.empty(d, d, dtype=_F32) if out is None or not direct else out
    accumulate = out is not None and direct
    _lib().covariance_cpu(
        x.data_ptr(), r, d, x.stride(0), x.stride(1), 0,
        0 if m is None else m.data_ptr(), 0 if m is None else m.stride(0), 0,
        target.data_ptr(), target.stride(0), 0, accumulate, _threads(),
    )
    if out is None:
        return target
    if not direct:
        out.copy_((out + out.T) * 0.5 + target)
    return out


def _rotated_chunks(a, g, q_a, q_s, dt):
    """(start, stop, gs [n, T, O], as [n, T, I]) per memory-bounded chunk of examples (rotations by
    _linalg.matmul: the compiled GEMM where it pays)."""
    n, t, i = a.shape
    o = g.shape[2]
    step = _torch_ops._chunk_rows(t * (o + i), dt, n)
    qs, qa = q_s.to(dt), q_a.to(dt)
    for start in range(0, n, step):
        stop = min(n, start + step)
        gs = _linalg.matmul(g[start:stop].to(dt), qs)
        as_ = _linalg.matmul(a[start:stop].to(dt), qa)
        yield start, stop, gs.contiguous(), as_.contiguous()


def lambda_accum_cpu(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_n (Q_Sᵀ G_n Q_A)² -> [O, I] fp32 (added into `out` when given)."""
    _require_cpu_dtype(a=a, g=g, q_a=q_a, q_s=q_s)  # upcast chunk by chunk (_rotated_chunks)
    n, t, i = a.shape
    o = g.shape[2]
    direct = out is None or _direct_out(out)
    target = torch.zeros(o, i, dtype=_F32) if not direct or out is None else out
    if _torch_ops.rotation_order(t, o, i) == "materialize":  # many tokens, narrow layer: G_n first, then rotated
        for _, _, rotated in _torch_ops.materialized_rotations(a, g, q_a, q_s, _F32, _linalg.matmul):
            target.add_(rotated.square_().sum(0))
        return _accumulated(target, out, direct)
    lib = _lib()
    for _, _, gs, as_ in _rotated_chunks(a, g, q_a, q_s, _F32):
        nc = gs.shape[0]
        lib.lambda_accum_rotated_cpu(
            gs.data_ptr(), t * o, o, 1, as_.data_ptr(), t * i, i, 1, 0, nc, t, o, i,
            target.data_ptr(), target.stride(0), 0, _threads(),
        )
    return _accumulated(target, out, direct)


def _accumulated(target: torch.Tensor, out: torch.Tensor | None, direct: bool) -> torch.Tensor:
    """The result of an op that summed into `target` (`out` itself when direct, else a float32 buffer)."""
    if out is None:
        return target
    if not direct:
        out.add_(target)
    return out


def score_self_cpu(a: torch.Tensor, g: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij -> [N] fp32."""
    _require_cpu_dtype(a=a, g=g, q_s=q_s, q_a=q_a, weights=weights)
    weights = _f32(weights)  # a, g, q_s, q_a are upcast chunk by chunk (_rotated_chunks)
    n, t, i = a.shape
    o = g.shape[2]
    out = torch.empty(n, dtype=_F32)
    if _torch_ops.rotation_order(t, o, i) == "materialize":  # many tokens, narrow layer: G_n first, then rotated
        for start, stop, rotated in _torch_ops.materialized_rotations(a, g, q_a, q_s, _F32, _linalg.matmul):
            out[start:stop] = (rotated.square_() * weights).sum((1, 2))
        return out
    lib = _lib()
    for start, stop, gs, as_ in _rotated_chunks(a, g, q_a, q_s, _F32):
        part = out[start:stop]
        lib.score_self_rotated_cpu(
            gs.data_ptr(), t * o, o, 1, as_.data_ptr(), t * i, i, 1, 0, stop - start, t, o, i,
            weights.data_ptr(), weights.stride(0), weights.stride(1), 0, part.data_ptr(), part.stride(0), 0,
            _threads(),
        )
    return out


# The sparse-g kernel (csrc/score_pairwise/score_pairwise_sparse_cpu.cpp) runs at ~0.85-0.9x the dense
# kernels' speed per flop (≈ 340-360 GFLOP/s on 2 cores): 1.5-1.7x faster overall at half zeros, a loss
# above ~0.85 nonzero.
SPARSE_G_MAX_DENSITY = 0.7
SPARSE_G_MIN_ENTRIES = 4096  # below this the choice costs more than it can save
SPARSE_G_MIN_QUERIES = 32    # its compression costs ~N·O·I/16 operations: amortised over enough queries
# (bench_score_pairwise.py, Q = 16: 1.6x slower than the dense kernel; Q = 200: faster)
# With T tokens it forms a row of G_n per nonzero (n, o) from T token rows, at a much lower rate than the
# materialised kernel's GEMMs: at half the (n, o) rows zero it measured 0.37-0.72x the materialised kernel's
# time at T = 8, 0.60-1.54x at T = 16 and 1.15-2.41x from T = 32 (Q = 32..200, O·I = 128·65..256·513; a small
# CNN's conv layer, T = 256 positions: 7x slower). A segment's stacked checkpoints (T = 2..8) keep it.
SPARSE_G_MAX_TOKENS = 8


def sparse_g_applies(q: int, t: int, entries: int, density: float) -> bool:
    """Whether score_pairwise_cpu contracts only the nonzero g (also the pipeline's cost model, so it
    plans the output-side rotation only where this kernel will run): enough queries and (example, o)
    entries, few enough of them nonzero, at most SPARSE_G_MAX_TOKENS tokens. `density`: the fraction of (n, o)
    with any nonzero g[n, :, o] (with T > 1 the kernel forms one row of G_n per such entry: (Q + T)·I flops each,
    as many per entry as the dense materialised kernel, but at a lower rate as T grows)."""
    return (q >= SPARSE_G_MIN_QUERIES and t <= SPARSE_G_MAX_TOKENS and entries >= SPARSE_G_MIN_ENTRIES
            and density <= SPARSE_G_MAX_DENSITY)


# The sparse-a-and-g kernel (same file) also compresses each example's a to its nonzero columns and contracts
# every nonzero row of G_n with the matching rows of V only: a gather that reuses each loaded row of V once, at
# about half the sparse-g kernel's rate per flop, lower for wider layers. Its time relative to the sparse-g kernel
# measured 0.1 + c(I)·d_a (d_a = fraction of (n, i) with any nonzero a; Q = 100-200, T = 1 and 2, host B, in one
# process alternating; bench_score_pairwise.py "sparse a" rows): c ≈ 1.35 at I ≤ 129, 1.4-1.75 at 257, 1.85-2.1 at
# 513, 1.8 at 1025 (columns taken 128 at a time). Modelled as 1.35 + 0.33 per doubling of I past 129, at most
# 2.0. It runs where that predicts at least 15 % less time: d_a ≤ 0.55 at I = 129 (a ReLU MLP's hidden layer: 0.50
# on the reg benchmark), 0.45 at 257, 0.37 from 513.
SPARSE_AG_MIN_GAIN = 0.85


def sparse_ag_relative_time(i: int, a_density: float) -> float:
    """The sparse-a-and-g kernel's time over the sparse-g kernel's for inputs of I columns, a fraction
    `a_density` of (example, column) entries nonzero (the measured model above)."""
    return 0.1 + min(2.0, 1.35 + 0.33 * max(0.0, math.log2(max(i, 1) / 129.0))) * a_density


def sparse_ag_applies(i: int, a_density: float) -> bool:
    """Whether, where the sparse-g kernel applies, the sparse-a-and-g kernel is expected to be faster."""
    return sparse_ag_relative_time(i, a_density) <= SPARSE_AG_MIN_GAIN


DENSITY_SAMPLE = 16  # examples read to estimate the density: the kernel choice only compares it with 0.7


def _density(g: torch.Tensor) -> float:
    """Fraction of (example, output) entries with a nonzero g over the tokens ([N, T, O]; the same for a's
    (example, input) entries), estimated on at most DENSITY_SAMPLE evenly strided examples (deterministic; a full
    pass cost 0.4 ms per call on a GPT-2 batch, for a choice that needs no precision)."""
    if g.shape[0] > DENSITY_SAMPLE:
        g = g[::-(-g.shape[0] // DENSITY_SAMPLE)]
    nonzero = g != 0
    if g.dim() == 3 and g.shape[1] > 1:
        nonzero = nonzero.any(dim=1)
    return float(torch.count_nonzero(nonzero)) / max(nonzero.numel(), 1)


QUERY_PAD = 16  # queries-innermost rows are padded to whole 16-float vectors (the kernel's panels)


def padded_queries(q: int) -> int:
    return -(-q // QUERY_PAD) * QUERY_PAD


def queries_innermost_empty(q: int, o: int, i: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [Q, O, I] view of a [O, I, Qs] buffer (Qs = padded_queries(Q)) whose padding
    lanes are zero: the layout the sparse kernel reads in place."""
    buf = torch.empty(o, i, padded_queries(q), dtype=dtype, device=device)
    buf[..., q:] = 0
    return buf[..., :q].permute(2, 0, 1)


def query_padding(v: torch.Tensor) -> torch.Tensor:
    """The padding lanes [O, I, Qs − Q] behind a `queries_innermost_empty` view v [Q, O, I] (what the sparse
    kernel reads past the last query)."""
    q, o, i = v.shape
    qs = v.stride(2)
    return torch.as_strided(v, (o, i, qs - q), (v.stride(1), qs, 1), v.storage_offset() + q)


def zero_query_padding(v: torch.Tensor) -> torch.Tensor:
    """v (a `queries_innermost_empty` view, e.g. handed back for reuse) with its padding lanes set to zero."""
    if v.stride(2) > v.shape[0]:
        query_padding(v).zero_()
    return v


def is_queries_innermost(v: torch.Tensor) -> bool:
    """Whether v [Q, O, I] is already laid out as `queries_innermost_empty` makes it (rows readable up to
    their padded width)."""
    q, o, i = v.shape
    s_q, s_o, s_i = v.stride()
    end = v.storage_offset() + (o - 1) * s_o + (i - 1) * s_i + padded_queries(q)  # the last row's padded panel
    return s_q == 1 and s_i >= padded_queries(q) and s_o == i * s_i \
        and end * v.element_size() <= v.untyped_storage().nbytes()


def _sparse_layout(v: torch.Tensor) -> torch.Tensor:
    """v [Q, O, I] as the sparse kernel reads it (see queries_innermost_empty): a view already laid out
    so (the pipeline stores directions that way) is used as it is, anything else is copied."""
    if is_queries_innermost(v):
        return v
    return queries_innermost_empty(*v.shape, dtype=v.dtype, device=v.device).copy_(v)


# The C++ score_pairwise kernels by name, as `sf.explain` reports them.
CPU_PAIRWISE_KERNELS = {
    "score_pairwise_cpu": "token-wise (one token, or the flop model's choice for few queries or long rows)",
    "score_pairwise_materialized_cpu": "materialised (rows of G_n formed in cache: the flop model's choice)",
    "score_pairwise_sparse_g_cpu": "sparse g (only the nonzero g[n, o] contracted: exact zeros such as ReLU's)",
    "score_pairwise_sparse_ag_cpu": "sparse a and g (only the nonzero a[n, i] and g[n, o]: a ReLU layer's inputs)",
}


SPARSE_KERNELS = ("score_pairwise_sparse_g_cpu", "score_pairwise_sparse_ag_cpu")  # read V queries-innermost


def cpu_pairwise_kernel(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> str:
    """The C++ kernel `score_pairwise_cpu` runs for these inputs (a key of CPU_PAIRWISE_KERNELS): token-wise
    (Q·N·T·O·I) or materialised (Q·N·O·I + T·N·O·I, rows of G_n formed in cache) by the shared flop model
    (with one token they cost the same and the token-wise kernel runs), or the sparse-g kernel where g has
    enough exact zeros (the sparse-a-and-g kernel where a has enough too)."""
    q, o, i = v.shape
    n, t, _ = a.shape
    strategy = _torch_ops.pairwise_strategy(q, n, t, o, i) if t > 1 else "tokenwise"
    sizes_ok = sparse_g_applies(q, t, n * o, 0.0)  # every condition but the density: g is read only when they hold
    if (t == 1 or strategy != "tokenwise") and sizes_ok and sparse_g_applies(q, t, n * o, _density(g)):
        # Exact zeros in g (ReLU-gated output gradients): only the nonzero g[n, o] are contracted (T > 1:
        # only the rows of G_n whose g[n, :, o] is not all zero, e.g. a segment's stacked checkpoints).
        # Inputs with exact zeros too (a ReLU layer's activations, unrotated): those columns are skipped as well.
        return "score_pairwise_sparse_ag_cpu" if sparse_ag_applies(i, _density(a)) else "score_pairwise_sparse_g_cpu"
    if t > 1 and strategy != "tokenwise":
        return "score_pairwise_materialized_cpu"
    return "score_pairwise_cpu"


def score_pairwise_cpu(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """scores[q, n] = Σ_t g_{n,t}ᵀ V_q a_{n,t} -> [Q, N] fp32. `out`: a float32 [Q, N] tensor (any strides) written
    in place and returned."""
    _require_cpu_dtype(v=v, a=a, g=g)
    q, o, i = v.shape
    n, t, _ = a.shape
    kernel = cpu_pairwise_kernel(v, a, g)
    v = _sparse_layout(_f32(v)) if kernel in SPARSE_KERNELS else _f32(v)  # a, g: chunk by chunk
    if out is None:
        out = torch.empty(q, n, dtype=_F32)
    # The kernel packs a, g and a [Q, n·T] partial per chunk: bound that like the torch backend does.
    step = _torch_ops._chunk_rows(t * (i + o + q), _F32, n)
    lib = _lib()
    for start in range(0, n, step):
        stop = min(n, start + step)
        ac, gc, part = _f32(a[start:stop]), _f32(g[start:stop]), out[:, start:stop]
        getattr(lib, kernel)(
            v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
            ac.data_ptr(), ac.stride(0), ac.stride(1), ac.stride(2),
            gc.data_ptr(), gc.stride(0), gc.stride(1), gc.stride(2), 0,
            q, stop - start, t, o, i, part.data_ptr(), part.stride(0), part.stride(1), 0, _threads(),
        )
    return out


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, T, D] token rows as [N·T, 1, D]: examples of one token (a view when the rows are evenly strided)."""
    return x.reshape(x.shape[0] * x.shape[1], 1, x.shape[2])


def score_per_token_cpu(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[q, n, t] = g_{n,t}ᵀ V_q a_{n,t} -> [Q, N, T] fp32: score_pairwise's one-token kernels on the token rows
    (the fused contraction never writes the [rows, Q·O] products that the torch backend forms in chunks)."""
    q = v.shape[0]
    n, t, _ = a.shape
    out = torch.empty(q, n, t, dtype=_F32)
    score_pairwise_cpu(v, token_rows(a), token_rows(g), out=out.view(q, n * t))
    return out


def score_lowrank_cpu(u: torch.Tensor, w: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """scores[q, n] = Σ_t Σ_r (U_qᵀ g_{n,t})_r (W_qᵀ a_{n,t})_r -> [Q, N] fp32, by two compiled GEMMs per chunk of
    examples: [rows, O] @ [O, Q·R] and [rows, I] @ [I, Q·R], then their product summed over tokens and ranks."""
    _require_cpu_dtype(u=u, w=w, a=a, g=g)
    q, o, r = u.shape
    n, t, i = a.shape
    u_all = _f32(u).permute(1, 0, 2).reshape(o, q * r)  # column q·R + k: query q's k-th factor
    w_all = _f32(w).permute(1, 0, 2).reshape(i, q * r)
    out = torch.empty(q, n, dtype=_F32)
    step = _torch_ops._chunk_rows(2 * q * t * r, _F32, n)  # the two [rows, Q·R] products per chunk
    for start in range(0, n, step):
        ac, gc = _f32(a[start:start + step]), _f32(g[start:start + step])
        m = ac.shape[0]
        gu = gemm_cpu(gc.reshape(m * t, o), u_all)
        gu.mul_(gemm_cpu(ac.reshape(m * t, i), w_all))
        out[:, start:start + m] = gu.view(m, t, q, r).sum((1, 3)).T
    return out


def spectral_weights_cpu(f: spectral.Spectral, lam: torch.Tensor) -> torch.Tensor:
    """f(Λ) in fp32 by the module's spectral_eval (the code the CUDA epilogue runs)."""
    lam_c = lam.to(_F32).contiguous().reshape(-1)
    w = torch.empty_like(lam_c)
    _lib().spectral_eval_cpu(_spectral_tuple(f), lam_c.data_ptr(), lam_c.numel(), 1, 0, w.data_ptr(), 0)
    return w.reshape(lam.shape)


def kron_project_cpu(v: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, lam: torch.Tensor,
                     fns: Sequence[spectral.Spectral]) -> tuple[torch.Tensor, ...]:
    """For each f: Q_S [f(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ -> [Q, O, I] fp32.

    The four GEMMs are torch (BLAS: a hand-written GEMM does not beat it); f(Λ) comes from the
    module's spectral_eval, which keeps the discrete forms accurate in fp32 (log1p/expm1)."""
    _require_f32(v=v, q_s=q_s, q_a=q_a, lam=lam)
    rotated = q_s.T @ v @ q_a
    return tuple(q_s @ (spectral_weights_cpu(f, lam) * rotated) @ q_a.T for f in fns)


# ---------------------------------------------------------------------------------------- CUDA


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    return torch.empty(max(int(numel), 1), dtype=_F32, device=device)


def covariance_cuda(x: torch.Tensor, mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_r m_r x_r x_rᵀ -> [D, D] fp32 (fp32/fp16/bf16 x); with `out`, out <- (out + outᵀ)/2 + C."""
    dev = x.device
    xc = x.contiguous()
    r, d = xc.shape
    m = None if mask is None else mask.to(_F32).contiguous()
    direct = out is None or _direct_out(out)
    target = torch.empty(d, d, dtype=_F32, device=dev) if out is None or not direct else out
    lib = _lib()
    with torch.cuda.device(dev):
        ws_numel = lib.covariance_cuda_workspace(r, d)
        ws = _workspace(ws_numel, dev)
        lib.covariance_cuda(
            xc.data_ptr(), r, d, xc.stride(0), xc.stride(1), _code(xc),
            0 if m is None else m.data_ptr(), 1, 0,
            target.data_ptr(), target.stride(0), 0, out is not None and direct,
            ws.data_ptr(), ws.numel(), _stream(dev),
        )
    if out is None:
        return target
    if not direct:
        out.copy_((out + out.T) * 0.5 + target)
    return out


def lambda_accum_cuda(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_n (Q_Sᵀ G_n Q_A)² -> [O, I] fp32 (fp32/fp16/bf16 tokens; added into `out` when given)."""
    dev = a.device
    n, t, i = a.shape
    o = g.shape[2]
    ac, gc = a.contiguous(), g.contiguous()
    qa, qs = q_a.to(_F32), q_s.to(_F32)  # any strides: column-major eigenvectors are read as such
    direct = out is None or _direct_out(out)
    target = torch.zeros(o, i, dtype=_F32, device=dev) if out is None or not direct else out
    lib = _lib()
    with torch.cuda.device(dev):
        step = _torch_ops._chunk_rows(t * (o + i), _F32, n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            nc = stop - start
            ws = _workspace(lib.lambda_accum_cuda_workspace(nc, t, o, i), dev)
            a_c, g_c = ac[start:stop], gc[start:stop]
            lib.lambda_accum_cuda(
                a_c.data_ptr(), a_c.stride(0), a_c.stride(1), a_c.stride(2),
                g_c.data_ptr(), g_c.stride(0), g_c.stride(1), g_c.stride(2), _code(a_c),
                qa.data_ptr(), qa.stride(0), qa.stride(1), qs.data_ptr(), qs.stride(0), qs.stride(1), 0,
                nc, t, o, i, target.data_ptr(), target.stride(0), 0, ws.data_ptr(), ws.numel(), _stream(dev),
            )
    if out is None:
        return target
    if not direct:
        out.add_(target)
    return out


def score_self_cuda(a: torch.Tensor, g: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij -> [N] fp32."""
    dev = a.device
    n, t, i = a.shape
    o = g.shape[2]
    ac, gc = a.contiguous(), g.contiguous()
    qa, qs, w = q_a.to(_F32), q_s.to(_F32), weights.to(_F32)
    out = torch.empty(n, dtype=_F32, device=dev)
    lib = _lib()
    with torch.cuda.device(dev):
        step = _torch_ops._chunk_rows(t * (o + i), _F32, n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            nc = stop - start
            ws = _workspace(lib.score_self_cuda_workspace(nc, t, o, i), dev)
            a_c, g_c, part = ac[start:stop], gc[start:stop], out[start:stop]
            lib.score_self_cuda(
                a_c.data_ptr(), a_c.stride(0), a_c.stride(1), a_c.stride(2),
                g_c.data_ptr(), g_c.stride(0), g_c.stride(1), g_c.stride(2), _code(a_c),
                qs.data_ptr(), qs.stride(0), qs.stride(1), qa.data_ptr(), qa.stride(0), qa.stride(1), 0,
                w.data_ptr(), w.stride(0), w.stride(1), 0, nc, t, o, i, part.data_ptr(), part.stride(0), 0,
                ws.data_ptr(), ws.numel(), _stream(dev),
            )
    return out


def score_pairwise_cuda(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """scores[q, n] = ⟨V_q, G_n⟩ -> [Q, N] fp32 (G_n tiles formed on the fly in shared memory)."""
    dev = a.device
    q, o, i = v.shape
    n, t, _ = a.shape
    dt = v.dtype if v.dtype == a.dtype == g.dtype else _F32
    vc, ac, gc = v.to(dt).contiguous(), a.to(dt).contiguous(), g.to(dt).contiguous()
    out = torch.empty(q, n, dtype=_F32, device=dev)
    lib = _lib()
    with torch.cuda.device(dev):
        ws = _workspace(lib.score_pairwise_cuda_workspace(q, n, t, o, i), dev)
        lib.score_pairwise_cuda(
            vc.data_ptr(), vc.stride(0), vc.stride(1), vc.stride(2),
            ac.data_ptr(), ac.stride(0), ac.stride(1), ac.stride(2),
            gc.data_ptr(), gc.stride(0), gc.stride(1), gc.stride(2), _code(vc),
            q, n, t, o, i, out.data_ptr(), out.stride(0), out.stride(1), 0, ws.data_ptr(), ws.numel(), _stream(dev),
        )
    return out


def score_lowrank_cuda(u: torch.Tensor, w: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """scores[q, n] = Σ_t Σ_r (U_qᵀ g_{n,t})_r (W_qᵀ a_{n,t})_r -> [Q, N] fp32 (V_q = U_q W_qᵀ and G_n never
    formed). Any strides are read as such; mixed input dtypes compute from fp32 copies."""
    dev = a.device
    q, o, r = u.shape
    n, t, i = a.shape
    dt = a.dtype if u.dtype == w.dtype == a.dtype == g.dtype else _F32
    uc, wc, ac, gc = u.to(dt), w.to(dt), a.to(dt), g.to(dt)
    out = torch.empty(q, n, dtype=_F32, device=dev)
    with torch.cuda.device(dev):
        _lib().score_lowrank_cuda(
            uc.data_ptr(), uc.stride(0), uc.stride(1), uc.stride(2),
            wc.data_ptr(), wc.stride(0), wc.stride(1), wc.stride(2),
            ac.data_ptr(), ac.stride(0), ac.stride(1), ac.stride(2),
            gc.data_ptr(), gc.stride(0), gc.stride(1), gc.stride(2), _code(ac),
            q, n, t, o, i, r, out.data_ptr(), out.stride(0), out.stride(1), 0, _stream(dev),
        )
    return out


def score_per_token_cuda(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[q, n, t] = g_{n,t}ᵀ V_q a_{n,t} -> [Q, N, T] fp32. Any strides are read as such; mixed input
    dtypes compute from fp32 copies."""
    dev = a.device
    q, o, i = v.shape
    n, t, _ = a.shape
    dt = a.dtype if v.dtype == a.dtype == g.dtype else _F32
    vc, ac, gc = v.to(dt), a.to(dt), g.to(dt)
    out = torch.empty(q, n, t, dtype=_F32, device=dev)
    with torch.cuda.device(dev):
        _lib().score_per_token_cuda(
            vc.data_ptr(), vc.stride(0), vc.stride(1), vc.stride(2),
            ac.data_ptr(), ac.stride(0), ac.stride(1), ac.stride(2),
            gc.data_ptr(), gc.stride(0), gc.stride(1), gc.stride(2), _code(ac),
            q, n, t, o, i, out.data_ptr(), out.stride(0), out.stride(1), out.stride(2), 0, _stream(dev),
        )
    return out


def kron_project_cuda(v: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, lam: torch.Tensor,
                      fns: Sequence[spectral.Spectral]) -> tuple[torch.Tensor, ...]:
    """For each f: Q_S [f(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ -> [Q, O, I] fp32; one rotation shared by all f."""
    dev = v.device
    q, o, i = v.shape
    vc = v.contiguous()
    qs, qa, lm = q_s.to(_F32), q_a.to(_F32), lam.to(_F32)
    outs = tuple(torch.empty(q, o, i, dtype=_F32, device=dev) for _ in fns)
    lib = _lib()
    with torch.cuda.device(dev):
        ws = _workspace(lib.kron_project_cuda_workspace(q, o, i), dev)
        lib.kron_project_cuda(
            vc.data_ptr(), vc.stride(0), vc.stride(1), vc.stride(2), _code(vc),
            qs.data_ptr(), qs.stride(0), qs.stride(1), qa.data_ptr(), qa.stride(0), qa.stride(1),
            lm.data_ptr(), lm.stride(0), lm.stride(1), 0, [_spectral_tuple(f) for f in fns],
            q, o, i, [t.data_ptr() for t in outs], 0, ws.data_ptr(), ws.numel(), _stream(dev),
        )
    return outs


# ----------------------------------------------------------------------------------- CPU GEMM
def gemm_cpu(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for float32 CPU tensors: [M,K]@[K,N], [B,M,K]@[K,N], [M,K]@[B,K,N] or [B,M,K]@[B,K,N].

    Any strides. A shared left factor (2-D @ 3-D) with fewer batch entries than threads runs as
    out[b]ᵀ = b[b]ᵀ aᵀ, so the shared operand is packed once and the row tiles of all entries are split
    between threads; with enough entries each thread multiplies whole entries of its own.
    `out`: a float32 tensor of the result's shape (any strides, not overlapping a or b) written in place
    and returned: callers reuse buffers (on this kind of host, first-touch page faults of a fresh
    300 MB result cost about as much as a third of the product)."""
    _require_f32(a=a, b=b)
    lib = _lib()
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = a.shape[0] if a.dim() == 3 else (b.shape[0] if b.dim() == 3 else 1)
    shape = (batch, m, n) if (a.dim() == 3 or b.dim() == 3) else (m, n)
    if out is None:
        out = torch.empty(shape, dtype=_F32)
    else:
        _require_f32(out=out)
        if tuple(out.shape) != shape:
            raise ValueError(f"out: expected shape {shape}, got {tuple(out.shape)}")
    out3 = out if out.dim() == 3 else out[None]
    if a.dim() == 2 and b.dim() == 3 and b.shape[0] < _threads():
        lib.gemm_batched_cpu(batch, b.data_ptr(), b.stride(0), b.stride(2), b.stride(1), a.data_ptr(), 0, a.stride(1),
                             a.stride(0), out3.data_ptr(), out3.stride(0), out3.stride(2), out3.stride(1), n, m, k,
                             _threads())
        return out
    if a.dim() == 3 and b.dim() == 2:
        try:  # fold the batch into the rows: one tall GEMM (a [B, 1, K] would waste an MR-row tile per entry)
            flat_out = out.view(-1, n)
            flat_a = a.view(-1, k)
        except RuntimeError:  # not viewable as rows: one product per batch entry, b packed once
            pass
        else:
            gemm_cpu(flat_a, b, out=flat_out)
            return out
    sab = a.stride(0) if a.dim() == 3 else 0  # batch stride 0: the operand is shared by every entry
    sbb = b.stride(0) if b.dim() == 3 else 0
    lib.gemm_batched_cpu(batch, a.data_ptr(), sab, a.stride(-2), a.stride(-1), b.data_ptr(), sbb, b.stride(-2),
                         b.stride(-1), out3.data_ptr(), out3.stride(0), out3.stride(1), out3.stride(2), m, n, k,
                         _threads())
    return out


def rank_one_product_cpu(left: torch.Tensor, g: torch.Tensor, a: torch.Tensor, weight: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """left @ (weight ⊙ g[q] a[q]ᵀ) for every query, float32 CPU, as a [Q, P, I] view of a [P, I, Qs] buffer
    (queries innermost, Qs = padded_queries(Q), padding lanes zero): the layout the sparse scoring kernel
    reads. left [P, O], g [Q, O], a [Q, I], weight [O, I] or None (ones); any strides (csrc/rank_one_product).
    `out`: such a view (e.g. `queries_innermost_empty(Q, P, I)`) written in place and returned."""
    _require_f32(left=left, g=g, a=a, weight=weight)
    if left.dim() != 2 or g.dim() != 2 or a.dim() != 2 or g.shape[0] != a.shape[0] or left.shape[1] != g.shape[1]:
        raise ValueError(f"left, g, a: expected [P, O], [Q, O], [Q, I] with matching O and Q, got "
                         f"{tuple(left.shape)}, {tuple(g.shape)}, {tuple(a.shape)}")
    (p, o), (q, i) = left.shape, a.shape
    if weight is not None and tuple(weight.shape) != (o, i):
        raise ValueError(f"weight: expected shape [O, I] = [{o}, {i}], got {tuple(weight.shape)}")
    if out is None:  # padding lanes left to the kernel, which zeroes them: pages first touched by its threads
        out = torch.empty(p, i, padded_queries(q), dtype=_F32, device=left.device)[..., :q].permute(2, 0, 1)
    elif tuple(out.shape) != (q, p, i) or out.dtype != _F32 or not is_queries_innermost(out):
        raise ValueError(f"out: expected a float32 queries-innermost [Q, P, I] = [{q}, {p}, {i}] view "
                         f"(queries_innermost_empty), got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    w_ptr, swo, swi = (0, 0, 0) if weight is None else (weight.data_ptr(), weight.stride(0), weight.stride(1))
    _lib().rank_one_product_cpu(left.data_ptr(), left.stride(0), left.stride(1), g.data_ptr(), g.stride(0),
                                g.stride(1), a.data_ptr(), a.stride(0), a.stride(1), w_ptr, swo, swi, p, q, o, i,
                                out.data_ptr(), out.stride(1), out.stride(2), padded_queries(q), _threads())
    return out


def to_queries_innermost_cpu(x: torch.Tensor, r: torch.Tensor | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """x ⊙ r for x [Q, O, I] and r [O, I] (or None: x itself), float32 CPU, written as a queries-innermost
    [Q, O, I] view of a [O, I, Qs] buffer (padding lanes zero): the same bits as torch.mul(x, r, out=...)
    into that layout, which reads x a page per element (csrc/to_queries_innermost). x: rows (one query's
    [O, I]) contiguous; `out`: such a view (e.g. from `queries_innermost_empty`), written and returned."""
    _require_f32(x=x, r=r, out=out)
    if x.dim() != 3:
        raise ValueError(f"x: expected [Q, O, I], got shape {tuple(x.shape)}")
    q, o, i = x.shape
    if x.stride(2) != 1 and i > 1 or x.stride(1) != i and o > 1:
        raise ValueError(f"x: expected each query's [O, I] contiguous, got strides {x.stride()}")
    if r is not None and (tuple(r.shape) != (o, i) or not r.is_contiguous()):
        raise ValueError(f"r: expected a contiguous [O, I] = [{o}, {i}], got {tuple(r.shape)} strides {r.stride()}")
    if out is None:  # padding lanes left to the kernel, which zeroes them
        out = torch.empty(o, i, padded_queries(q), dtype=_F32, device=x.device)[..., :q].permute(2, 0, 1)
    elif tuple(out.shape) != (q, o, i) or not is_queries_innermost(out):
        raise ValueError(f"out: expected a queries-innermost [Q, O, I] = [{q}, {o}, {i}] view "
                         f"(queries_innermost_empty), got {tuple(out.shape)} strides {out.stride()}")
    _lib().to_queries_innermost_cpu(x.data_ptr(), x.stride(0) if q > 1 else o * i, 0 if r is None else r.data_ptr(),
                                    q, o * i, out.data_ptr(), out.stride(2), padded_queries(q), _threads())
    return out


def _conv_output_size(x: torch.Tensor, kernel_size, stride, dilation, padding) -> tuple[int, int]:
    """Checks of a Conv2d geometry on x [B, C, H, W] (float32 CPU) and its output size (OH, OW)."""
    _require_f32(x=x)
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, C, H, W], got shape {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"x: expected a CPU tensor, got device {x.device}")
    for name, pair, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("dilation", dilation, 1),
                              ("padding", [p for side in padding for p in side], 0)):
        if any(v < least for v in pair):
            raise ValueError(f"{name}: expected >= {least}, got {' x '.join(map(str, pair))}")
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    (pt, pb), (pl, pr) = padding
    b, c, h, w = x.shape
    oh, ow = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"x: spatial size {h} x {w} with padding {tuple(map(tuple, padding))} is smaller than the "
                         f"dilated kernel {dh * (kh - 1) + 1} x {dw * (kw - 1) + 1}")
    return oh, ow


def conv_patch_rows_cpu(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                        padding: Sequence[Sequence[int]], bias: bool) -> torch.Tensor:
    """A Conv2d's activation rows [B, OH·OW, C·KH·KW (+1 column of ones with `bias`)] from its input x
    [B, C, H, W], float32 CPU, any strides; `padding` ((top, bottom), (left, right)) zeros (csrc/conv_patch_rows:
    each row written once, in order; F.unfold + transpose + torch.cat write the patches twice)."""
    oh, ow = _conv_output_size(x, kernel_size, stride, dilation, padding)
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    (pt, _), (pl, _) = padding
    b, c, h, w = x.shape
    out = torch.empty(b, oh * ow, c * kh * kw + int(bias), dtype=_F32)
    _lib().conv_patch_rows_cpu(x.data_ptr(), b, c, h, w, *x.stride(), kh, kw, sh, sw, dh, dw, pt, pl, oh, ow,
                               bool(bias), out.data_ptr(), _threads())
    return out


def conv_group_grads_cpu(x: torch.Tensor, gy: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                         dilation: Sequence[int], padding: Sequence[Sequence[int]], bias: bool) -> torch.Tensor:
    """Per-example gradients [B, C, M, KH·KW (+1 with `bias`)] of a Conv2d whose groups read one channel each, from
    its input x [B, C, H, W] (float32 CPU, any strides) and output gradient gy [B, C·M, OH, OW] (float32 CPU; copied
    to contiguous unless its planes are): out[b, c, j, k] = Σ over output positions of gy[b, c·M + j] times channel
    c's patch value k, the last column gy's sum (csrc/conv_group_grads)."""
    oh, ow = _conv_output_size(x, kernel_size, stride, dilation, padding)
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    (pt, _), (pl, _) = padding
    b, c, h, w = x.shape
    _require_f32(gy=gy)
    if gy.device.type != "cpu":
        raise ValueError(f"gy: expected a CPU tensor, got device {gy.device}")
    if gy.dim() != 4 or gy.shape[0] != b or gy.shape[1] % max(c, 1) or tuple(gy.shape[2:]) != (oh, ow):
        raise ValueError(f"gy: expected [B={b}, C·M (C={c}), OH={oh}, OW={ow}], got {tuple(gy.shape)}")
    if gy.stride(3) != 1 or gy.stride(2) != ow:
        gy = gy.contiguous()
    m = gy.shape[1] // c if c else 1
    out = torch.empty(b, c, m, kh * kw + int(bias), dtype=_F32)
    _lib().conv_group_grads_cpu(x.data_ptr(), b, c, h, w, *x.stride(), gy.data_ptr(), m, gy.stride(0), gy.stride(1),
                                kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, bool(bias), out.data_ptr(), _threads())
    return out


def conv_patch_covariance_cpu(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                              dilation: Sequence[int], padding: Sequence[Sequence[int]], bias: bool) -> torch.Tensor:
    """Per channel c of x [B, C, H, W] (float32 CPU, any strides), Σ over images and output positions of r rᵀ with r
    channel c's KH·KW patch (and a 1 with `bias`): [C, D, D], what the patch rows of a convolution whose groups
    read one channel each would give its groups' covariances, without writing them (csrc/conv_patch_covariance)."""
    oh, ow = _conv_output_size(x, kernel_size, stride, dilation, padding)
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    (pt, _), (pl, _) = padding
    b, c, h, w = x.shape
    d = kh * kw + int(bias)
    out = torch.empty(c, d, d, dtype=_F32)
    _lib().conv_patch_covariance_cpu(x.data_ptr(), b, c, h, w, *x.stride(), kh, kw, sh, sw, dh, dw, pt, pl, oh, ow,
                                     bool(bias), out.data_ptr(), _threads())
    return out
