"""score_pairwise: scores[q, n] = ⟨V_q, G_n⟩ = Σ_t g_{n,t}ᵀ V_q a_{n,t}, G_n never in global memory.

Math (SOURCE_MATH.md §7): v [Q, O, I] (preconditioned query directions), a [N, T, I], g [N, T, O],
G_n = Σ_t g_{n,t} a_{n,t}ᵀ [O, I]; result [Q, N] fp32.

Strategy: the contraction is a GEMM, scores = V_flat [Q, O·I] @ G_flat [N, O·I]ᵀ, whose right operand is
formed on chip. One program per (block of BLOCK_N examples, block of BLOCK_Q queries) walks K in steps of
one output row o × BLOCK_I inputs; per step it forms the examples' gradient tile
G[n, o, i0:i0+BLOCK_I] = Σ_t g[n, t, o] a[n, t, i0:i0+BLOCK_I] in fp32 registers (one FMA per element and
token) and adds V_tile [BLOCK_Q, BLOCK_I] @ G_tileᵀ to a [BLOCK_Q, BLOCK_N] fp32 accumulator with tl.dot
(tensor cores: wgmma on sm_90). Each score is written once, by its own program: deterministic, no atomics.

Grid: axis 0 = example blocks (fastest), so the programs resident together share one query block and
read the same V tiles in the same order (L2 hits); axis 1 = query blocks.

Cost: Q·N·O·I MACs for the contraction plus N·T·O·I FMAs per query block for forming G: meant for few
tokens per example (one token, or a segment's stacked checkpoints); with many tokens the torch backend's
token-wise/materialised choice is cheaper. Block shapes (_common.PAIRWISE_GPU_BLOCKS) were picked from the
sm_90 build's resource report (no spills; a test keeps it so), not from device timings.

History: the first kernel (until 2026-11-26) contracted each on-chip G_n tile with the queries by
elementwise FMAs and ran at 1.2-1.9 TFLOP/s on an H200 (benchmarks/results/ops_nvidia_h200.md, whose
triton score_pairwise rows, and so the dispatch table's entries, are that kernel's). This one has not yet
run on a GPU.

Precision: with v, a and g all fp16 (or all bf16) the fp32 G tile is rounded to that dtype for the
contraction (fp32 accumulation), as a same-precision computation would; otherwise every dot is IEEE fp32
(never TF32). Output fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _score_pairwise_kernel(v_ptr, a_ptr, g_ptr, out_ptr, Q, N, T, O, I,
                           s_vq, s_vo, s_vi, s_an, s_at, s_ai, s_gn, s_gt, s_go, s_oq, s_on,
                           BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, DOT: tl.constexpr):
    """out[qb, nb] = V[qb] G[nb]ᵀ over the flattened (o, i) axis for the query block program_id(1) and the
    example block program_id(0); every tensor strided (strides in elements)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_i = tl.arange(0, BLOCK_I)
    n_ok = offs_n < N
    q_ok = offs_q < Q
    a_rows = a_ptr + offs_n * s_an  # [BLOCK_N] example bases (int64 offsets: N·T·I may pass 2^31)
    g_rows = g_ptr + offs_n * s_gn
    v_rows = v_ptr + offs_q * s_vq
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    # A K-step is one output row o and BLOCK_I consecutive inputs i: G's tile is g[n, t, o] (one value per
    # example) times a row block of a, so it is formed in the [BLOCK_N, BLOCK_I] layout the dot reads.
    for o in range(0, O):
        for i0 in range(0, I, BLOCK_I):
            ii = i0 + offs_i
            i_ok = ii < I
            grad = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
            for t in range(0, T):
                g = tl.load(g_rows + t * s_gt + o * s_go, mask=n_ok, other=0.0)
                a = tl.load(a_rows[:, None] + t * s_at + ii[None, :] * s_ai, mask=n_ok[:, None] & i_ok[None, :],
                            other=0.0)
                grad += g.to(tl.float32)[:, None] * a.to(tl.float32)
            v = tl.load(v_rows[:, None] + o * s_vo + ii[None, :] * s_vi, mask=q_ok[:, None] & i_ok[None, :],
                        other=0.0)
            acc = _common.mma(v, tl.trans(grad), acc, DOT)
    tl.store(out_ptr + offs_q[:, None] * s_oq + offs_n[None, :] * s_on, acc, mask=q_ok[:, None] & n_ok[None, :])


def score_pairwise_triton(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """scores[q, n] = Σ_t g_{n,t}ᵀ V_q a_{n,t} -> [Q, N] fp32; v [Q, O, I], a [N, T, I], g [N, T, O] (any
    strides)."""
    q, o, i = v.shape
    n, t, _ = a.shape
    out = torch.empty(q, n, dtype=torch.float32, device=a.device)
    if out.numel() == 0:
        return out
    if t == 0 or o == 0 or i == 0:
        return out.zero_()
    same = v.dtype == a.dtype == g.dtype
    dot = _common.dot_code(a.dtype) if same else _common.DOT_F32
    block_q, block_n, block_i, warps = _common.pairwise_blocks(q, n, i, dot)
    grid_n = triton.cdiv(n, block_n)
    for q0 in range(0, q, block_q * _common.MAX_GRID_YZ):  # axis 1 holds at most 65535 query blocks
        vq, oq = v[q0:q0 + block_q * _common.MAX_GRID_YZ], out[q0:q0 + block_q * _common.MAX_GRID_YZ]
        _score_pairwise_kernel[(grid_n, triton.cdiv(vq.shape[0], block_q))](
            vq, a, g, oq, vq.shape[0], n, t, o, i,
            *vq.stride(), *a.stride(), *g.stride(), *oq.stride(),
            BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_I=block_i, DOT=dot, num_warps=warps,
        )
    return out
