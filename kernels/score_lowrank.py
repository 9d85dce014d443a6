"""score_lowrank: scores for low-rank query directions V_q = U_q W_qᵀ, neither V_q nor G_n formed.

Math (SOURCE_MATH.md §7): u [Q, O, R], w [Q, I, R], a [N, T, I], g [N, T, O];
scores[q, n] = ⟨U_q W_qᵀ, G_n⟩ = Σ_t Σ_r (U_qᵀ g_{n,t})_r (W_qᵀ a_{n,t})_r, result [Q, N] fp32.

Strategy: one program per (block of BLOCK_Q queries, block of BLOCK_N examples). It walks the examples'
tokens in steps of BLOCK_T, so each step is a tile of BLOCK_N·BLOCK_T token rows (the M of the dots). The
dots' columns are (query, rank) pairs, BLOCK_Q queries × BLOCK_R ranks: per step it forms gu = g_rows [U_q]
and aw = a_rows [W_q] ([M, BLOCK_Q·BLOCK_R], tl.dot, fp32 accumulators), reduces gu ⊙ aw over each query's
ranks to [M, BLOCK_Q] and that over the tile's tokens to one value per (example, query), added to the
program's fp32 accumulator. Several queries share a program when their ranks fit one block: the token rows it
reads serve BLOCK_Q queries, so each multiply-add streams 2 / (BLOCK_Q·BLOCK_R) + 2 / M bytes instead of
2 / R + 2 / M (one query per program streamed ≈ 0.06 bytes per multiply-add at R = 32: L2 could not feed the
tensor cores). More ranks than a block: one query per program, ranks in BLOCK_R steps. When U_q and W_q fit
one tile each (RESIDENT, see `_blocks.lowrank_blocks`) they are loaded once per program, before the token
loop; otherwise they are streamed in K-tiles (from L2) inside it. Each score is written once, by its own
program, after a fixed-order reduction: deterministic, no atomics, `torch.empty` output fully written.

Cost: Q·N·T·R·(O + I) MACs instead of ≥ Q·N·O·I for a dense V_q. Grid: axis 0 = query blocks (fastest), so
the programs reading one block of tokens run together and share it through L2; axis 1 = example blocks
(chunked by the launcher below the 65535 limit).

Layout: the launcher pads o, i and r to multiples of ALIGN (zeros, which add nothing), so that Triton can
prove the rows aligned and pipeline the token loop's loads (asynchronous copies); a test compiles the kernel
for sm_90 without a GPU and checks for them.

Precision: the dots run in the input dtype for fp16/bf16 when u, w, a, g share it (fp32
accumulation), else in IEEE fp32 (never TF32); gu ⊙ aw and all reductions are fp32. Output fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _blocks, _common


@triton.jit
def _rank_sums(gu, aw, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """Σ_r gu ⊙ aw per (row, query): [BLOCK_M, BLOCK_Q·BLOCK_R] columns (query j, rank r) -> [BLOCK_M, BLOCK_Q]."""
    return tl.sum(tl.reshape(gu * aw, (BLOCK_M, BLOCK_Q, BLOCK_R)), axis=2)


@triton.jit
def _score_lowrank_kernel(u_ptr, w_ptr, a_ptr, g_ptr, out_ptr, Q, N, T, O, I, R, n_start,
                          s_uq, s_uo, s_ur, s_wq, s_wi, s_wr, s_an, s_at, s_ai, s_gn, s_gt, s_go, s_oq, s_on,
                          BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
                          RESIDENT: tl.constexpr, DOT: tl.constexpr):
    """out[q, n] = Σ_t Σ_r (g[n, t] U_q)_r (a[n, t] W_q)_r for the BLOCK_Q queries program_id(0)·BLOCK_Q + [0,
    BLOCK_Q) and the BLOCK_N examples n_start + program_id(1)·BLOCK_N + [0, BLOCK_N); every tensor strided
    (strides in elements). BLOCK_Q > 1 only when all R ranks fit BLOCK_R."""
    BLOCK_M: tl.constexpr = BLOCK_N * BLOCK_T
    q0 = tl.program_id(0).to(tl.int64) * BLOCK_Q
    n0 = n_start + tl.program_id(1).to(tl.int64) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    ex = n0 + offs_m // BLOCK_T  # example of each token row (int64)
    tok = offs_m % BLOCK_T       # token of each row within the step
    ex_ok = ex < N
    a_row = a_ptr + ex * s_an
    g_row = g_ptr + ex * s_gn
    offs_c = tl.arange(0, BLOCK_Q * BLOCK_R)
    col_q = q0 + offs_c // BLOCK_R  # query of each dot column (int64)
    col_r = offs_c % BLOCK_R        # rank of each dot column
    q_ok = col_q < Q
    u_cols = u_ptr + col_q * s_uq
    w_cols = w_ptr + col_q * s_wq
    offs_o = tl.arange(0, BLOCK_O)
    offs_i = tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
    if RESIDENT:
        # [U_q] [O, BLOCK_Q·R] and [W_q] [I, BLOCK_Q·R] in one tile each: loaded once, kept for every token step.
        c_ok = q_ok & (col_r < R)
        u = tl.load(u_cols[None, :] + offs_o.to(tl.int64)[:, None] * s_uo + col_r[None, :] * s_ur,
                    mask=(offs_o < O)[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_cols[None, :] + offs_i.to(tl.int64)[:, None] * s_wi + col_r[None, :] * s_wr,
                    mask=(offs_i < I)[:, None] & c_ok[None, :], other=0.0)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + tok
            row_ok = ex_ok & (tt < T)
            t64 = tt.to(tl.int64)
            g = tl.load(g_row[:, None] + t64[:, None] * s_gt + offs_o.to(tl.int64)[None, :] * s_go,
                        mask=row_ok[:, None] & (offs_o < O)[None, :], other=0.0)
            a = tl.load(a_row[:, None] + t64[:, None] * s_at + offs_i.to(tl.int64)[None, :] * s_ai,
                        mask=row_ok[:, None] & (offs_i < I)[None, :], other=0.0)
            gu = _common.mma(g, u, tl.zeros((BLOCK_M, BLOCK_Q * BLOCK_R), dtype=tl.float32), DOT)
            aw = _common.mma(a, w, tl.zeros((BLOCK_M, BLOCK_Q * BLOCK_R), dtype=tl.float32), DOT)
            per_row = _rank_sums(gu, aw, BLOCK_M, BLOCK_Q, BLOCK_R)  # [BLOCK_M, BLOCK_Q]
            acc += tl.sum(tl.reshape(per_row, (BLOCK_N, BLOCK_T, BLOCK_Q)), axis=1)
    else:
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + tok
            row_ok = ex_ok & (tt < T)
            t64 = tt.to(tl.int64)
            g_rows = g_row + t64 * s_gt
            a_rows = a_row + t64 * s_at
            per_row = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + col_r
                c_ok = q_ok & (rr < R)
                gu = tl.zeros((BLOCK_M, BLOCK_Q * BLOCK_R), dtype=tl.float32)
                for o0 in range(0, O, BLOCK_O):
                    oo = o0 + offs_o
                    o_ok = oo < O
                    g = tl.load(g_rows[:, None] + oo.to(tl.int64)[None, :] * s_go,
                                mask=row_ok[:, None] & o_ok[None, :], other=0.0)
                    u = tl.load(u_cols[None, :] + oo.to(tl.int64)[:, None] * s_uo + rr[None, :] * s_ur,
                                mask=o_ok[:, None] & c_ok[None, :], other=0.0)
                    gu = _common.mma(g, u, gu, DOT)
                aw = tl.zeros((BLOCK_M, BLOCK_Q * BLOCK_R), dtype=tl.float32)
                for i0 in range(0, I, BLOCK_I):
                    ii = i0 + offs_i
                    i_ok = ii < I
                    a = tl.load(a_rows[:, None] + ii.to(tl.int64)[None, :] * s_ai,
                                mask=row_ok[:, None] & i_ok[None, :], other=0.0)
                    w = tl.load(w_cols[None, :] + ii.to(tl.int64)[:, None] * s_wi + rr[None, :] * s_wr,
                                mask=i_ok[:, None] & c_ok[None, :], other=0.0)
                    aw = _common.mma(a, w, aw, DOT)
                per_row += _rank_sums(gu, aw, BLOCK_M, BLOCK_Q, BLOCK_R)
            acc += tl.sum(tl.reshape(per_row, (BLOCK_N, BLOCK_T, BLOCK_Q)), axis=1)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    tl.store(out_ptr + offs_q[None, :] * s_oq + offs_n[:, None] * s_on, acc,
             mask=(offs_n < N)[:, None] & (offs_q < Q)[None, :])


def score_lowrank_triton(u: torch.Tensor, w: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """scores[q, n] = Σ_t Σ_r (U_qᵀ g_{n,t})_r (W_qᵀ a_{n,t})_r -> [Q, N] fp32; u [Q, O, R], w [Q, I, R],
    a [N, T, I], g [N, T, O] (any strides; fp16/bf16/fp32)."""
    q, o, r = u.shape
    n, t, i = a.shape
    out = torch.empty(q, n, dtype=torch.float32, device=a.device)
    if out.numel() == 0:
        return out
    if t == 0 or o == 0 or i == 0 or r == 0:
        return out.zero_()
    same = u.dtype == w.dtype == a.dtype == g.dtype
    dot = _common.dot_code(a.dtype) if same else _common.DOT_F32
    o_pad, i_pad, r_pad = (_common.round_up(k, _common.ALIGN) for k in (o, i, r))
    u = _common.padded(u, (q, o_pad, r_pad))
    w = _common.padded(w, (q, i_pad, r_pad))
    a = _common.padded(a, (n, t, i_pad))
    g = _common.padded(g, (n, t, o_pad))
    cfg = _blocks.lowrank_blocks(q, n, t, o_pad, i_pad, r_pad, dot)
    blocks = triton.cdiv(n, cfg.block_n)
    for b0 in range(0, blocks, _common.MAX_GRID_YZ):
        nb = min(blocks - b0, _common.MAX_GRID_YZ)
        _score_lowrank_kernel[(triton.cdiv(q, cfg.block_q), nb)](
            u, w, a, g, out, q, n, t, o_pad, i_pad, r_pad, b0 * cfg.block_n,
            *u.stride(), *w.stride(), *a.stride(), *g.stride(), *out.stride(),
            BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o,
            BLOCK_I=cfg.block_i, BLOCK_R=cfg.block_r, RESIDENT=cfg.resident, DOT=dot, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out
