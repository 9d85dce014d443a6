"""The `torch` backend: always available, memory-bounded (chunked), fp32 accumulation.

It is the production fallback, not the oracle (that is source_fast/reference/): it never forms all
per-example gradients at once, and it exploits structure (one token per example makes every
per-example gradient rank one).

Inputs are validated by source_fast.ops; these functions assume contiguous-or-not tensors of
consistent shapes on one device. Accumulation dtype: float64 for float64 inputs, else float32.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _config, spectral


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunk_rows(per_row_elems: int, dtype: torch.dtype, total: int) -> int:
    """Rows per chunk so that one chunk's temporary stays within SOURCE_FAST_CHUNK_MIB."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, _config.chunk_bytes() // max(1, per_row_elems * itemsize))
    return min(rows, max(total, 1))


def materialized_examples(q: int, n: int, per_example_bytes: int, least: int = 1,
                          free_bytes: int | None = None) -> int:
    """Examples per chunk of materialised G_n on a GPU: SOURCE_FAST_CHUNK_MIB's budget, but at least 2·Q examples
    (and `least`), so that the queries, read once per chunk, stream at most half the bytes G does and the product
    has 2·Q output columns or more; above the budget, at most a quarter of the device's free memory (free_bytes,
    when known), and never more than N. (The Triton form and the torch backend on a GPU both use it.)"""
    wanted = max(2 * q, least)
    if free_bytes is not None:
        wanted = min(wanted, max(1, free_bytes // 4 // max(per_example_bytes, 1)))
    budget = _config.chunk_bytes() // max(1, per_example_bytes)
    return min(max(n, 1), max(1, budget, wanted))


def _pairwise_chunk(q: int, n: int, per_example_elems: int, dtype: torch.dtype, device: torch.device) -> int:
    """Examples per materialised chunk of score_pairwise: the budget (`_chunk_rows`), widened on a GPU by
    `materialized_examples` (on the H100 the budget's 128 examples of 1024 × 1025 made each cuBLAS product a
    512 × 128 output: 130 ms for Q = 512, N = 8192, T = 16, bf16)."""
    if device.type != "cuda":
        return _chunk_rows(per_example_elems, dtype, n)
    return materialized_examples(q, n, per_example_elems * dtype.itemsize,
                                 free_bytes=torch.cuda.mem_get_info(device)[0])


def covariance(x: torch.Tensor, mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_r m_r x_r x_rᵀ over rows of x [R, D] -> [D, D], symmetric, accumulated in ≥ fp32."""
    dt = acc_dtype(x) if out is None else out.dtype
    d = x.shape[1]
    result = torch.zeros(d, d, dtype=dt, device=x.device) if out is None else out
    step = _chunk_rows(d, dt, x.shape[0])
    for start in range(0, x.shape[0], step):
        xs = x[start:start + step].to(dt)
        # The mask weighs one factor only: Σ m x xᵀ (linear in m, as the contract says).
        weighted = xs if mask is None else xs * mask[start:start + step].to(dt)[:, None]
        result.addmm_(weighted.T, xs)
    # Symmetrise: addmm is symmetric in exact arithmetic only.
    result.copy_((result + result.T) * 0.5)
    return result


def _rotate_tokens(a, g, q_a, q_s, dt):
    return g.to(dt) @ q_s.to(dt), a.to(dt) @ q_a.to(dt)


# Q_Sᵀ G_n Q_A for an example of T token rows, two ways (multiply-adds per example):
#   rows first:        rotate the rows (T·O² + T·I²), then G̃_n = Σ_t g̃_t ã_tᵀ (T·O·I);
#   materialise first: G_n = Σ_t g_t a_tᵀ (T·O·I), then rotate it (O²·I + O·I²).
# Rotating G_n wins with many tokens on narrow layers: a small CNN's conv layers (T = 256..1024 positions, O·I
# = 16·28..32·145) count 3.2-3.4x fewer and measured 3.0-3.1x faster on CPU (2-core Zen 4, 128 examples, the
# cpu backend); at equal counts both took the same time, at half the count twice as long. GEMM rates differ a
# little between the two orders, hence the margin.
MATERIALIZE_FIRST_MIN_GAIN = 1.2


def rotation_order(t: int, o: int, i: int) -> str:
    """'rows' or 'materialize': how lambda_accum and score_self form Q_Sᵀ G_n Q_A for T tokens (the
    multiply-add counts above; one token is always 'rows', a rank-one product of the rotated rows)."""
    rows = t * (o * o + i * i + o * i)
    materialized = t * o * i + o * i * (o + i)
    return "materialize" if t > 1 and rows > MATERIALIZE_FIRST_MIN_GAIN * materialized else "rows"


def materialized_rotations(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                           dt: torch.dtype, rotate=torch.matmul):
    """(start, stop, Q_Sᵀ G_n Q_A [n, O, I]) per memory-bounded chunk of examples, G_n = Σ_t g aᵀ formed first
    (`rotation_order` 'materialize') by torch's batched GEMM. `rotate`: the product for the two rotations (the
    cpu backend passes the compiled GEMM; for the small per-example G_n torch's batched path measured faster,
    e.g. 2.1 against 3.5 ms for 128 examples of 1024 positions, O·I = 16·28)."""
    n, t, i = a.shape
    o = g.shape[2]
    step = _chunk_rows(3 * o * i + t * (o + i), dt, n)
    qs_t, qa = q_s.to(dt).T, q_a.to(dt)
    for start in range(0, n, step):
        stop = min(n, start + step)
        grads = torch.matmul(g[start:stop].to(dt).transpose(1, 2), a[start:stop].to(dt))  # [n, O, I]
        yield start, stop, rotate(qs_t, rotate(grads, qa))


def _rotated_examples(a, g, q_a, q_s, dt):
    """(start, stop, Q_Sᵀ G_n Q_A [n, O, I]) per chunk, in the cheaper `rotation_order` (T > 1)."""
    n, t, i = a.shape
    o = g.shape[2]
    if rotation_order(t, o, i) == "materialize":
        yield from materialized_rotations(a, g, q_a, q_s, dt)
        return
    step = _chunk_rows(o * i + t * (o + i), dt, n)
    for start in range(0, n, step):
        gs, as_ = _rotate_tokens(a[start:start + step], g[start:start + step], q_a, q_s, dt)
        yield start, min(n, start + step), torch.bmm(gs.transpose(1, 2), as_)
        del gs, as_  # free this chunk before the next is allocated (peak = one chunk)


def lambda_accum(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_n (Q_Sᵀ G_n Q_A)² -> [O, I]; a [N, T, I], g [N, T, O]."""
    dt = acc_dtype(a, g) if out is None else out.dtype
    n, t, i = a.shape
    o = g.shape[2]
    result = torch.zeros(o, i, dtype=dt, device=a.device) if out is None else out
    if t == 1:
        # Rank-one per-example gradients: (Q_Sᵀ g)(Q_Aᵀ a)ᵀ squared is (Q_Sᵀg)²((Q_Aᵀa)²)ᵀ: one GEMM.
        step = _chunk_rows(o + i, dt, n)
        for start in range(0, n, step):
            gs, as_ = _rotate_tokens(a[start:start + step, 0], g[start:start + step, 0], q_a, q_s, dt)
            result.addmm_(gs.square().T, as_.square())
        return result
    for _, _, rotated in _rotated_examples(a, g, q_a, q_s, dt):
        result.add_(rotated.square_().sum(0))
        del rotated
    return result


def kron_project(v: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, lam: torch.Tensor,
                 fns: Sequence[spectral.Spectral]) -> tuple[torch.Tensor, ...]:
    """For each f: Q_S [f(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ, one rotation shared by all outputs; v [Q, O, I]."""
    dt = acc_dtype(v, q_s, q_a, lam)
    qs, qa = q_s.to(dt), q_a.to(dt)
    rotated = qs.T @ v.to(dt) @ qa
    lam_c = lam.to(dt)
    return tuple(qs @ (spectral.evaluate(f, lam_c) * rotated) @ qa.T for f in fns)


def pairwise_strategy(q: int, n: int, t: int, o: int, i: int) -> str:
    """Cost model for ⟨V_q, G_n⟩: 'materialize' forms G_n in chunks (N·T·O·I + Q·N·O·I flops, one
    large GEMM); 'tokenwise' contracts per token (Q·N·T·O·I flops, no G_n). Chooses fewer flops."""
    materialize = n * t * o * i + q * n * o * i
    tokenwise = q * n * t * (o * i + o)
    return "tokenwise" if tokenwise < materialize else "materialize"


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_fp32_out_mm: dict[tuple[str, int | None, torch.dtype], bool] = {}


def has_fp32_out_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has `torch.mm(x, y, out_dtype=torch.float32)` for 16-bit x, y on `device`: tensor-core
    products with fp32 accumulation *and* an fp32 result (CUDA builds of recent torch; no CPU kernel). Probed
    once per device and dtype."""
    if device.type != "cuda" or dtype not in _SIXTEEN_BIT:
        return False
    key = (device.type, device.index, dtype)
    if key not in _fp32_out_mm:
        try:
            x = torch.ones(16, 16, dtype=dtype, device=device)
            _fp32_out_mm[key] = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _fp32_out_mm[key] = False
    return _fp32_out_mm[key]


def _mm_fp32_out(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, y, out_dtype=torch.float32)


def score_pairwise(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """scores[q, n] = Σ_t g_{n,t}ᵀ V_q a_{n,t} -> [Q, N].

    All-16-bit inputs on a device with fp32-output 16-bit products (`has_fp32_out_mm`) keep their dtype in the
    GEMMs, with fp32 accumulation and results: token-wise, VA = V a_tᵀ (then the contraction with g in fp32);
    materialised, G_n in the inputs' dtype (rounded once, like the Triton kernel's on-chip tile) and one GEMM.
    Otherwise everything is upcast to fp32 (or float64)."""
    dt = acc_dtype(v, a, g)
    q, o, i = v.shape
    n, t, _ = a.shape
    strategy = pairwise_strategy(q, n, t, o, i)
    if v.dtype == a.dtype == g.dtype and has_fp32_out_mm(a.device, a.dtype):
        out = torch.empty(q, n, dtype=torch.float32, device=a.device)
        if strategy == "tokenwise":  # VA = V a_tᵀ for every token (one GEMM per chunk), then Σ_o,t with g in fp32
            v_rows = v.reshape(q * o, i)
            step = _chunk_rows(q * t * o, torch.float32, n)
            for start in range(0, n, step):
                ac, gc = a[start:start + step], g[start:start + step]
                va = _mm_fp32_out(v_rows, ac.reshape(-1, i).T).view(q, o, ac.shape[0], t)
                out[:, start:start + step] = torch.einsum("qont,nto->qn", va, gc.float())
                del va
            return out
        v_flat = v.reshape(q, o * i)
        step = _pairwise_chunk(q, n, o * i, a.dtype, a.device)
        for start in range(0, n, step):
            grads = torch.bmm(g[start:start + step].transpose(1, 2), a[start:start + step]).reshape(-1, o * i)
            out[:, start:start + step] = _mm_fp32_out(v_flat, grads.T)
            del grads
        return out
    vf = v.to(dt)
    out = torch.empty(q, n, dtype=dt, device=a.device)
    if strategy == "tokenwise":
        step = _chunk_rows(q * t * o, dt, n)
        for start in range(0, n, step):
            va = torch.einsum("qoi,nti->qnto", vf, a[start:start + step].to(dt))
            out[:, start:start + step] = torch.einsum("qnto,nto->qn", va, g[start:start + step].to(dt))
            del va
        return out
    v_flat = vf.reshape(q, o * i)
    step = _pairwise_chunk(q, n, o * i, dt, a.device)
    for start in range(0, n, step):
        ga, aa = g[start:start + step].to(dt), a[start:start + step].to(dt)
        grads = torch.bmm(ga.transpose(1, 2), aa).reshape(-1, o * i)  # G_n, [n, O·I], chunk only
        out[:, start:start + step] = v_flat @ grads.T
        del ga, aa, grads
    return out


def score_self(a: torch.Tensor, g: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij -> [N] (self-influence of one EK-FAC operator)."""
    dt = acc_dtype(a, g)
    n, t, i = a.shape
    o = g.shape[2]
    w = weights.to(dt)
    out = torch.empty(n, dtype=dt, device=a.device)
    if t == 1:
        # Rank one: Σ_ij W_ij (Q_Sᵀg)_i² (Q_Aᵀa)_j² = rowsum(((Q_Sᵀg)² W) ⊙ (Q_Aᵀa)²).
        step = _chunk_rows(o + i, dt, n)
        for start in range(0, n, step):
            gs, as_ = _rotate_tokens(a[start:start + step, 0], g[start:start + step, 0], q_a, q_s, dt)
            out[start:start + step] = ((gs.square() @ w) * as_.square()).sum(1)
        return out
    for start, stop, rotated in _rotated_examples(a, g, q_a, q_s, dt):
        out[start:stop] = (rotated.square_() * w).sum((1, 2))
        del rotated
    return out


def score_lowrank(u: torch.Tensor, w: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Low-rank queries V_q = U_q W_qᵀ: scores[q, n] = Σ_t Σ_r (U_qᵀ g_{n,t})_r (W_qᵀ a_{n,t})_r.

    Q·N·T·R·(O + I) flops instead of ≥ Q·N·O·I: neither V_q nor G_n is ever formed."""
    dt = acc_dtype(u, w, a, g)
    q, o, r = u.shape
    n, t, i = a.shape
    out = torch.empty(q, n, dtype=dt, device=a.device)
    uf, wf = u.to(dt), w.to(dt)
    step = _chunk_rows(2 * q * t * r, dt, n)
    for start in range(0, n, step):
        gu = torch.einsum("nto,qor->qntr", g[start:start + step].to(dt), uf)
        aw = torch.einsum("nti,qir->qntr", a[start:start + step].to(dt), wf)
        out[:, start:start + step] = (gu * aw).sum((2, 3))
    return out


def score_per_token(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-token scores [Q, N, T]: g_{n,t}ᵀ V_q a_{n,t} (token-wise contraction, chunked over N)."""
    dt = acc_dtype(v, a, g)
    q, o, i = v.shape
    n, t, _ = a.shape
    out = torch.empty(q, n, t, dtype=dt, device=a.device)
    v_rows = v.to(dt).reshape(q * o, i)
    step = _chunk_rows(q * t * o, dt, n)
    for start in range(0, n, step):
        ac, gc = a[start:start + step].to(dt), g[start:start + step].to(dt)
        m = ac.shape[0]
        # One large GEMM over all (example, token) rows and (query, output) columns, then the g-weighted
        # sum over outputs as a batched matrix-vector product (einsum's form ran ~1.4x slower on CPU).
        va = (ac.reshape(m * t, i) @ v_rows.T).reshape(m * t, q, o)
        per_row = torch.bmm(va, gc.reshape(m * t, o, 1))  # [m·t, Q, 1]: one pass over va
        out[:, start:start + step] = per_row.reshape(m, t, q).permute(2, 0, 1)
        del va
    return out
