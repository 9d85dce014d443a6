"""score_pairwise: scores[q, n] = ⟨V_q, G_n⟩ = Σ_t g_{n,t}ᵀ V_q a_{n,t}, G_n never in global memory.

Math (SOURCE_MATH.md §7): v [Q, O, I] (preconditioned query directions), a [N, T, I], g [N, T, O],
G_n = Σ_t g_{n,t} a_{n,t}ᵀ [O, I]; result [Q, N] fp32.

Strategy ("form G_n on chip"): one program per training example n walks the (O-tile, I-tile) grid;
for each tile it forms G_n[tile] = Σ_t g_{n,t}[O-tile] a_{n,t}[I-tile]ᵀ with tl.dot over T (fp32
accumulator, in registers), then contracts it with every query's tile, BLOCK_Q queries at a time,
as a [BLOCK_Q, BLOCK_O, BLOCK_I] elementwise product reduced to [BLOCK_Q]. Partial scores over
tiles are accumulated in the program's own output column (read-modify-write by one program only:
deterministic, no atomics; the first tile overwrites, so `torch.empty` output is fully written).

Cost: N·T·O·I MACs on tensor cores (forming each G_n tile exactly once) + Q·N·O·I fp32 FMAs for the
contraction, and V is streamed from L2/HBM once per example (Q·O·I·N reads). The alternative,
contracting per token (V_q a_{n,t} then · g_{n,t}), costs Q·N·T·O·I; the torch backend picks
whichever has fewer flops (`_torch_ops.pairwise_strategy`). This kernel always forms G_n tiles:
it is never worse than the token-wise form by more than the contraction term Q·N·O·I and wins by
a factor ≈ T when T ≫ 1.

Precision: the G_n dot runs in the input dtype for fp16/bf16 (fp32 accumulation) and IEEE fp32 for
fp32; V is read in its dtype and the contraction is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _score_pairwise_kernel(v_ptr, a_ptr, g_ptr, out_ptr, Q, N, T, O, I,
                           BLOCK_Q: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                           BLOCK_T: tl.constexpr, DOT: tl.constexpr):
    """out[:, n] = Σ_{o,i} V[:, o, i] G_n[o, i] for n = program_id(0); a [N·T, I], g [N·T, O],
    v [Q, O, I], out [Q, N], all contiguous."""
    n = tl.program_id(0)
    row0 = n.to(tl.int64) * T
    offs_q = tl.arange(0, BLOCK_Q)
    for o0 in range(0, O, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < O
        for i0 in range(0, I, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_ok = offs_i < I
            grad = _common.example_grad_tile(g_ptr, a_ptr, row0, T, O, I, offs_o, o_ok, offs_i, i_ok,
                                             BLOCK_O, BLOCK_I, BLOCK_T, DOT)
            first = (o0 == 0) & (i0 == 0)
            oi = offs_o.to(tl.int64)[:, None] * I + offs_i[None, :]  # [BO, BI] offset inside V_q
            oi_ok = o_ok[:, None] & i_ok[None, :]
            for q0 in range(0, Q, BLOCK_Q):
                qq = q0 + offs_q
                q_ok = qq < Q
                v_ptrs = v_ptr + qq.to(tl.int64)[:, None, None] * O * I + oi[None, :, :]
                v = tl.load(v_ptrs, mask=q_ok[:, None, None] & oi_ok[None, :, :], other=0.0).to(tl.float32)
                part = tl.sum(tl.sum(v * grad[None, :, :], axis=2), axis=1)  # [BLOCK_Q]
                o_ptrs = out_ptr + qq.to(tl.int64) * N + n
                prev = tl.load(o_ptrs, mask=q_ok, other=0.0)
                tl.store(o_ptrs, tl.where(first, part, prev + part), mask=q_ok)


def score_pairwise_triton(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """scores[q, n] = Σ_t g_{n,t}ᵀ V_q a_{n,t} -> [Q, N] fp32; v [Q, O, I], a [N, T, I], g [N, T, O]."""
    v, a, g = v.contiguous(), a.contiguous(), g.contiguous()
    q, o, i = v.shape
    n, t, _ = a.shape
    out = torch.empty(q, n, dtype=torch.float32, device=a.device)
    if out.numel() == 0:
        return out
    if t == 0 or o == 0 or i == 0:
        return out.zero_()
    block_o, block_i, block_t = _common.pairwise_blocks(o, i, t)
    _score_pairwise_kernel[(n,)](
        v, a, g, out, q, n, t, o, i,
        BLOCK_Q=_common.pairwise_q_block(q), BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t,
        DOT=_common.dot_code(a.dtype), num_warps=_common.num_warps(),
    )
    return out
