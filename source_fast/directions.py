"""Query directions as the scoring pipeline holds them ([Q, O, I] per layer), and the output-side
rotation W ↦ Q_S W into the queries-innermost layout the CPU sparse-g kernel reads.

`RankOneDirections` keeps W_q = weight ⊙ (g_q a_qᵀ) as its factors: with one token per query the
rotated query gradient is rank one, and the influence walk only multiplies it by f(Λ). Its output-side
product is one C++ kernel on CPU (csrc/rank_one_product: the factors folded into the GEMM's operands) and
is formed a block of columns at a time elsewhere, so the dense [Q, O, I] tensor never exists (it and its
queries-innermost copy were the two largest allocations of an influence scoring call).

`LowRankDirections` keeps a direction truncated to rank R by SVD (`SourceAnalyzer(query_rank=R)`), as Kronfluence's
low-rank query gradients do: V_q = U_q W_qᵀ, scored by `ops.score_lowrank`.
"""
from __future__ import annotations

import logging

import torch

from . import _compiled, _extension, _linalg

log = logging.getLogger(__name__)

_CHUNK_BYTES = 16 << 20  # one block of columns of the queries-innermost product (a reused heap block)
_COMPILED_MIN_FLOPS = 4.0e6  # below this the compiled product's setup costs more than it saves


class RankOneDirections:
    """W[q] = weight ⊙ (g[q] a[q]ᵀ) for g [Q, O], a [Q, I], weight [O, I] or None (= ones)."""

    def __init__(self, g: torch.Tensor, a: torch.Tensor, weight: torch.Tensor | None = None):
        if g.dim() != 2 or a.dim() != 2 or g.shape[0] != a.shape[0]:
            raise ValueError(f"g and a must be [Q, O] and [Q, I] with the same Q, got {tuple(g.shape)} and "
                             f"{tuple(a.shape)}")
        if weight is not None and tuple(weight.shape) != (g.shape[1], a.shape[1]):
            raise ValueError(f"weight must be [O, I] = [{g.shape[1]}, {a.shape[1]}], got {tuple(weight.shape)}")
        self.g, self.a, self.weight = g, a, weight

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.g.shape[0], self.g.shape[1], self.a.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.g.dtype

    def weighted(self, weight: torch.Tensor) -> "RankOneDirections":
        w = weight.to(self.dtype) if self.weight is None else self.weight * weight.to(self.dtype)
        return RankOneDirections(self.g, self.a, w)

    def dense(self) -> torch.Tensor:
        out = torch.mul(self.g[:, :, None], self.a[:, None, :])
        return out if self.weight is None else out.mul_(self.weight)

    def left_product_queries_innermost(self, left: torch.Tensor) -> torch.Tensor:
        """left @ W[q] for every query, like `left_product_queries_innermost(left, self.dense())`.

        On CPU in fp32, csrc/rank_one_product: g and a folded into the product's operands, the result written
        straight into the queries-innermost layout. Otherwise each block of columns of weight ⊙ (g aᵀ) is
        formed in a small scratch (queries innermost) and multiplied into the result buffer."""
        left = left.to(self.dtype)
        if _compiled_rank_one_ok(left, self):
            return _extension.rank_one_product_cpu(left, self.g, self.a, self.weight)
        q, o, i = self.shape
        qs = _extension.padded_queries(q)
        buf = torch.empty(left.shape[0], i, qs, dtype=self.dtype, device=self.g.device)
        cols = _columns_per_chunk(o, i, qs, buf.element_size())
        scratch = torch.zeros(o, cols, qs, dtype=self.dtype, device=self.g.device)  # padding lanes stay 0
        g_t, a_t = self.g.T.contiguous(), self.a.T.contiguous()  # [O, Q], [I, Q]
        for i0 in range(0, i, cols):
            width = min(cols, i - i0)
            part = scratch[:, :width]
            torch.mul(g_t[:, None, :], a_t[None, i0:i0 + width, :], out=part[..., :q])
            if self.weight is not None:
                part[..., :q].mul_(self.weight[:, i0:i0 + width, None])
            _linalg.matmul(left, part.view(o, width * qs), out=buf[:, i0:i0 + width].view(-1, width * qs))
        return buf[..., :q].permute(2, 0, 1)


def left_product_queries_innermost(left: torch.Tensor, v: torch.Tensor | RankOneDirections) -> torch.Tensor:
    """left @ v[q] for every query (left square), as a [Q, O, I] view of a zero-padded [O, I, Qs] buffer:
    the layout the sparse kernel reads its query panels from (any backend accepts the view).

    v is copied into that layout (or, already laid out so, used as it is: the result then overwrites
    it), then each run of i columns, a 2-D [O, i·Qs] block, is multiplied through a chunk-sized scratch
    and copied back: one buffer of the result's size in all (a second one would cost its first-touch
    page faults and peak memory; the copy-back is ~10 % of that)."""
    if isinstance(v, RankOneDirections):
        return v.left_product_queries_innermost(left)
    q, o, i = v.shape
    v = _extension._sparse_layout(v)  # in place when the walk already wrote it so
    qs = v.stride(2)
    buf = _padded_buffer(v)
    left = left.to(buf.dtype)
    cols = _columns_per_chunk(o, i, qs, buf.element_size())
    scratch = torch.empty(o, cols * qs, dtype=buf.dtype, device=buf.device)
    for i0 in range(0, i, cols):
        part = buf[:, i0:i0 + cols]
        width = part.shape[1] * qs
        tmp = _linalg.matmul(left, part.reshape(o, width), out=scratch[:, :width])
        part.copy_(tmp.view(o, -1, qs))
    return buf[..., :q].permute(2, 0, 1)


def right_product_queries_innermost(v: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """v[q] @ right for every query (right [I, I]), v a `left_product_queries_innermost` result (queries
    innermost): overwritten and returned in that layout, per output row buf[o] = rightᵀ @ buf[o] ([I, I] @
    [I, Qs]) through a chunk-sized scratch. With the left product this turns W into Q_S W Q_Aᵀ without leaving
    the layout the sparse kernels read."""
    q, o, i = v.shape
    if not _extension.is_queries_innermost(v):
        raise ValueError("v must be laid out queries-innermost (a left_product_queries_innermost result)")
    qs = v.stride(2)
    buf = _padded_buffer(v)
    left = right.to(buf.dtype).T
    rows = max(1, min(o, _CHUNK_BYTES // max(1, i * qs * buf.element_size())))
    scratch = torch.empty(rows, i, qs, dtype=buf.dtype, device=buf.device)
    for o0 in range(0, o, rows):
        part = buf[o0:o0 + rows]
        part.copy_(torch.matmul(left, part, out=scratch[:part.shape[0]]))
    return buf[..., :q].permute(2, 0, 1)


def _padded_buffer(v: torch.Tensor) -> torch.Tensor:
    """The padded [O, I, Qs] buffer behind a queries-innermost view v [Q, O, I]."""
    _, o, i = v.shape
    qs = v.stride(2)
    return torch.as_strided(v, (o, i, qs), (i * qs, qs, 1))


class LowRankDirections:
    """V[q] = u[q] w[q]ᵀ for u [Q, O, R], w [Q, I, R]: directions truncated to rank R (`truncated`), scored by
    `ops.score_lowrank` in Q·N·T·R·(O + I) multiply-adds, without forming V_q or G_n."""

    def __init__(self, u: torch.Tensor, w: torch.Tensor):
        if u.dim() != 3 or w.dim() != 3 or u.shape[0] != w.shape[0] or u.shape[2] != w.shape[2]:
            raise ValueError(f"u and w must be [Q, O, R] and [Q, I, R] with the same Q and R, got {tuple(u.shape)} "
                             f"and {tuple(w.shape)}")
        self.u, self.w = u, w

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.u.shape[0], self.u.shape[1], self.w.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    @property
    def device(self) -> torch.device:
        return self.u.device

    @property
    def rank(self) -> int:
        return self.u.shape[2]

    def dense(self) -> torch.Tensor:
        return torch.bmm(self.u, self.w.transpose(1, 2))

    def cast(self, fn) -> "LowRankDirections":
        """Both factors through fn (e.g. a dtype conversion)."""
        return LowRankDirections(fn(self.u), fn(self.w))


OVERSAMPLING = 10  # extra columns of the subspace iteration beyond the rank: faster convergence
MAX_POWER_STEPS = 8  # then the queries whose triplets have not converged take the full SVD
# A triplet (u, σ, w) has converged when ‖V w − σ u‖ ≤ max(ROUND_OFF·ε·σ₁, DISCARDED_FRACTION·σ_{R+1}): at round-off,
# or far below what the truncation discards anyway (σ_{R+1} is the 2-norm of V − V_R).
ROUND_OFF = 1e3
DISCARDED_FRACTION = 1e-3


def truncated(v: torch.Tensor, rank: int) -> torch.Tensor | LowRankDirections:
    """Each query's direction (v [Q, O, I]) by its best rank-`rank` approximation (the truncated SVD: Eckart–Young in
    the Frobenius norm), as factors with the singular values on u; v itself where rank ≥ min(O, I) (exact).

    A full SVD costs O(O·I·min(O, I)) per query (13 s for 64 queries of a 1024 × 1025 layer on 2 cores), more than
    scoring thousands of examples, so where the rank is small next to the layer (rank + OVERSAMPLING < min(O, I)/2)
    the top singular triplets come from a seeded block subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4:
    GEMMs of Q·O·I·(rank + OVERSAMPLING) per step). It stops when every query's triplets have residuals
    ‖V w_r − σ_r u_r‖ ≤ max(ROUND_OFF·ε·σ₁, DISCARDED_FRACTION·σ_{R+1}): V_R is then off the exact truncation by
    a thousandth of what the truncation itself discards (or by round-off); queries not converged after
    MAX_POWER_STEPS (flat spectra) take the full SVD. The directions SOURCE walks have fast-decaying spectra (σ₈/σ₁
    of 1e-3 to 1e-7 on the benchmark MLP), so a few steps do.
    Deterministic: the start block is seeded."""
    q, o, i = v.shape
    if rank >= min(o, i):
        return v
    k = rank + OVERSAMPLING
    if 2 * k >= min(o, i):
        return _svd_factors(v, rank)
    gen = torch.Generator(device=v.device).manual_seed(0)
    mm = _linalg.matmul
    y = torch.linalg.qr(mm(v, torch.randn(q, i, k, generator=gen, dtype=v.dtype, device=v.device)))[0]
    round_off = ROUND_OFF * torch.finfo(v.dtype).eps
    for step in range(MAX_POWER_STEPS + 1):
        if step:  # one power step: y ← orth(V Vᵀ y), each product orthonormalised against round-off
            y = torch.linalg.qr(mm(v, torch.linalg.qr(mm(v.transpose(1, 2), y))[0]))[0]
        ub, sv, vh = torch.linalg.svd(mm(y.transpose(1, 2), v), full_matrices=False)  # of V's projection
        u = mm(y, ub[:, :, :rank]) * sv[:, None, :rank]
        w = vh[:, :rank, :].transpose(1, 2)
        residual = (mm(v, w) - u).norm(dim=1).amax(1)  # ‖V w_r − σ_r u_r‖, the largest over r
        converged = residual <= torch.maximum(round_off * sv[:, 0], DISCARDED_FRACTION * sv[:, rank])
        if bool(converged.all()):
            break
    log.debug("truncated %s to rank %d: %d power steps, %d of %d queries by the full SVD", tuple(v.shape), rank,
              step, int((~converged).sum()), q)
    out = LowRankDirections(u, w.contiguous())
    if not bool(converged.all()):
        rest = (~converged).nonzero().flatten()
        exact = _svd_factors(v[rest], rank)
        out.u[rest], out.w[rest] = exact.u, exact.w
    return out


def _svd_factors(v: torch.Tensor, rank: int) -> LowRankDirections:
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    return LowRankDirections(u[:, :, :rank] * s[:, None, :rank], vh[:, :rank, :].transpose(1, 2).contiguous())


def as_dense(v: torch.Tensor | RankOneDirections | LowRankDirections) -> torch.Tensor:
    return v.dense() if isinstance(v, (RankOneDirections, LowRankDirections)) else v


def _columns_per_chunk(o: int, i: int, qs: int, element_size: int) -> int:
    return max(1, min(i, _CHUNK_BYTES // max(1, o * qs * element_size)))


def _compiled_rank_one_ok(left: torch.Tensor, d: RankOneDirections) -> bool:
    """Whether csrc/rank_one_product runs this product (enough work, and `_compiled.usable`)."""
    q, o, i = d.shape
    if 2.0 * left.shape[0] * q * o * i < _COMPILED_MIN_FLOPS:
        return False
    tensors = (left, d.g, d.a) + (() if d.weight is None else (d.weight,))
    return _compiled.usable("rank_one_product", _check, *tensors)


def _check() -> bool:
    from .reference import rank_one_product_ref

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(19, 23, generator=gen)
    a, w = torch.randn(19, 37, generator=gen), torch.rand(23, 37, generator=gen)
    left = torch.randn(29, 23, generator=gen)
    got, want = _extension.rank_one_product_cpu(left, g, a, w), rank_one_product_ref(left, g, a, w)
    return torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
