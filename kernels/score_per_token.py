"""score_per_token: per-token scores out[q, n, t] = g_{n,t}ᵀ V_q a_{n,t} (their sum over t is score_pairwise).

Math (SOURCE_MATH.md §7): v [Q, O, I], a [N, T, I], g [N, T, O]; result [Q, N, T] fp32.

Strategy (the token-wise contraction of score_pairwise, without the sum over t): one program per
(query q, tile of BLOCK_M token rows of the flattened N·T rows). For each O-tile it forms
va = a_rows V_qᵀ[:, O-tile] ([BLOCK_M, BLOCK_O], tl.dot over I in BLOCK_I steps, fp32 accumulator),
multiplies it by the rows' g[O-tile] and reduces over O into one fp32 value per token row, which is
written once, by its own program: deterministic, no atomics, `torch.empty` output fully written.

Cost: Q·N·T·O·I MACs (the per-token output admits no G_n shortcut). Both dot operands come straight from
memory (token rows and V_q tiles), so the inner loop is a plain pipelined GEMM; this is also
score_pairwise's token-wise form (`tokenwise_scores`). Grid: when every query's V together
outgrows L2 (ROWS_FASTEST_V_BYTES), row tiles are the fastest axis, so the programs running together share
one V_q; otherwise queries are, and they share one tile of rows. The slower axis is chunked by the launcher
below the 65535 limit. Row offsets are int64.

Layout: the launcher pads o and i to multiples of ALIGN (zeros, which add nothing) and flattens a and g to
[N·T, ·] rows of one stride (a view when each example's tokens follow each other, else a copy), so that Triton
can prove the rows aligned and pipeline the inner loop's loads (asynchronous copies); a test compiles the kernel
for sm_90 without a GPU and checks for them.

Precision: the dot runs in the input dtype for fp16/bf16 when v, a, g share it (fp32 accumulation),
else in IEEE fp32 (never TF32); the product with g and the reduction are fp32. Output fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _blocks, _common


@triton.jit
def _score_per_token_kernel(v_ptr, a_ptr, g_ptr, out_ptr, O, I, ROWS, row_start, q_start,
                            s_vq, s_vo, s_vi, s_ar, s_ai, s_gr, s_go, s_oq,
                            BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, DOT: tl.constexpr,
                            ROWS_FASTEST: tl.constexpr):
    """out[q, row] = Σ_o g[row, o] Σ_i V[q, o, i] a[row, i] for one query q and the BLOCK_M token rows of one
    tile (a [ROWS, I] and g [ROWS, O] with row strides s_ar, s_gr; v strided; out [Q, ROWS] with row stride s_oq
    and unit column stride). ROWS_FASTEST: row tiles on grid axis 0 and queries on axis 1 (programs running
    together share V_q through L2), else the other way round (they share the rows)."""
    if ROWS_FASTEST:
        tile = tl.program_id(0).to(tl.int64)
        q = q_start + tl.program_id(1).to(tl.int64)
    else:
        q = q_start + tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1).to(tl.int64)
    # Rows of one stride (the launcher flattens examples × tokens): one scalar base per tile, small per-row
    # offsets. Per-row example/token pointers (an int64 division per row) held 60 more registers in the sm_90
    # build.
    row0 = row_start + tile * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < ROWS - row0
    a_rows = a_ptr + row0 * s_ar + offs_m.to(tl.int64) * s_ar
    g_rows = g_ptr + row0 * s_gr + offs_m.to(tl.int64) * s_gr
    v_q = v_ptr + q * s_vq
    offs_o = tl.arange(0, BLOCK_O)
    offs_i = tl.arange(0, BLOCK_I)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for o0 in range(0, O, BLOCK_O):
        oo = o0 + offs_o
        o_ok = oo < O
        o64 = oo.to(tl.int64)
        va = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            ii = i0 + offs_i
            i_ok = ii < I
            i64 = ii.to(tl.int64)
            a = tl.load(a_rows[:, None] + i64[None, :] * s_ai, mask=row_ok[:, None] & i_ok[None, :], other=0.0)
            vt = tl.load(v_q + i64[:, None] * s_vi + o64[None, :] * s_vo, mask=i_ok[:, None] & o_ok[None, :],
                         other=0.0)  # V_qᵀ tile [BLOCK_I, BLOCK_O]
            va = _common.mma(a, vt, va, DOT)
        g = tl.load(g_rows[:, None] + o64[None, :] * s_go, mask=row_ok[:, None] & o_ok[None, :], other=0.0)
        total += tl.sum(va * g.to(tl.float32), axis=1)
    tl.store(out_ptr + q * s_oq + row0 + offs_m, total, mask=row_ok)


# V for every query bigger than this (bytes): row tiles go on the fastest grid axis, so that the programs running
# together share one V_q through L2 instead of each streaming its own from memory.
ROWS_FASTEST_V_BYTES = 16 << 20


def tokenwise_scores(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [Q, N·T] (a view with unit column stride) ← g_{n,t}ᵀ V_q a_{n,t} per token row: the token-wise GEMM
    VA = a V_qᵀ with the contraction against g in its epilogue. Shared by score_per_token and by score_pairwise
    for few tokens (`_blocks.PAIRWISE_TOKENWISE_GPU`)."""
    q, o, i = v.shape
    n, t, _ = a.shape
    same = v.dtype == a.dtype == g.dtype
    dot = _common.dot_code(a.dtype) if same else _common.DOT_F32
    if dot == _common.DOT_F32:
        dot = _blocks.fp32_dot("per_token")
    rows = n * t
    o_pad, i_pad = _common.round_up(o, _common.ALIGN), _common.round_up(i, _common.ALIGN)
    v = _common.padded(v, (q, o_pad, i_pad))
    # [N·T, ·] rows of one stride: a view where the tokens of an example follow each other, else a copy.
    a = _common.padded(a, (n, t, i_pad)).reshape(rows, i_pad)
    g = _common.padded(g, (n, t, o_pad)).reshape(rows, o_pad)
    block_m, block_o, block_i, warps, stages = _blocks.per_token_blocks(rows, o_pad, i_pad, dot)
    rows_fastest = v.numel() * v.element_size() > ROWS_FASTEST_V_BYTES
    tiles = triton.cdiv(rows, block_m)
    common = dict(BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_I=block_i, DOT=dot, ROWS_FASTEST=rows_fastest,
                  num_warps=warps, num_stages=stages)
    strides = (*v.stride(), *a.stride(), *g.stride(), out.stride(0))
    if rows_fastest:  # axis 1 (queries) holds at most 65535
        for q0 in range(0, q, _common.MAX_GRID_YZ):
            nq = min(q - q0, _common.MAX_GRID_YZ)
            _score_per_token_kernel[(tiles, nq)](v, a, g, out, o_pad, i_pad, rows, 0, q0, *strides, **common)
    else:  # axis 1 (row tiles) holds at most 65535
        for b0 in range(0, tiles, _common.MAX_GRID_YZ):
            nb = min(tiles - b0, _common.MAX_GRID_YZ)
            _score_per_token_kernel[(q, nb)](v, a, g, out, o_pad, i_pad, rows, b0 * block_m, 0, *strides,
                                             **common)
    return out


def score_per_token_triton(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[q, n, t] = g_{n,t}ᵀ V_q a_{n,t} -> [Q, N, T] fp32; v [Q, O, I], a [N, T, I], g [N, T, O]
    (any strides; fp16/bf16/fp32)."""
    q, o, i = v.shape
    n, t, _ = a.shape
    out = torch.empty(q, n, t, dtype=torch.float32, device=a.device)
    if out.numel() == 0:
        return out
    if o == 0 or i == 0:
        return out.zero_()
    tokenwise_scores(v, a, g, out.view(q, n * t))
    return out
