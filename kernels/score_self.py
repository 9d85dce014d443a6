"""score_self: self-influence of one EK-FAC operator, s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij.

Math (SOURCE_MATH.md §3-4, self-influence): a [N, T, I], g [N, T, O], Q_S [O, O], Q_A [I, I],
W = f(Λ) [O, I]. With rotated tokens ĝ = g Q_S and â = a Q_A, M_n = Q_Sᵀ G_n Q_A = Σ_t ĝ_{n,t} â_{n,t}ᵀ
and s[n] = Σ_ij W_ij M_n[i, j]² = ⟨G_n, f(H) G_n⟩.

Same structure as lambda_accum's fused kernel, weighted and not reduced over n: the tokens are
rotated once by the batched GEMM of `_common.bmm` (N·T·(O² + I²) flops), then one program per
example walks the (O-tile, I-tile) grid, forms each M_n tile over T in registers (N·T·O·I flops),
and reduces W ⊙ M_n² into a scalar in registers. M_n is never written to memory; each s[n] is
written once by its own program (deterministic, no atomics). T == 1 needs no special case: the
rank-one M_n tile is a K = 1 (masked) tl.dot, N·O·I flops in total.

Precision: as lambda_accum — dots in the input dtype for fp16/bf16 (rotated tokens stored in it),
IEEE fp32 for fp32; M_n, its square, W and the reduction are fp32. Output fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _blocks, _common
from .lambda_accum import rotate_tokens


@triton.jit
def _score_self_kernel(gs_ptr, as_ptr, w_ptr, out_ptr, T, O, I,
                       BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, DOT: tl.constexpr,
                       ONE_CHUNK: tl.constexpr):
    """out[n] = Σ_{o,i} W[o, i] (Σ_t ĝ[n, t, o] â[n, t, i])² for n = program_id(0).

    ĝ [N·T, O], â [N·T, I], W [O, I] contiguous.
    """
    n = tl.program_id(0)
    row0 = n.to(tl.int64) * T
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for o0 in range(0, O, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < O
        for i0 in range(0, I, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_ok = offs_i < I
            m = _common.example_grad_tile(gs_ptr, as_ptr, row0, T, O, I, offs_o, o_ok, offs_i, i_ok,
                                          BLOCK_O, BLOCK_I, BLOCK_T, DOT, ONE_CHUNK)
            w = tl.load(w_ptr + offs_o.to(tl.int64)[:, None] * I + offs_i[None, :], mask=o_ok[:, None] & i_ok[None, :],
                        other=0.0).to(tl.float32)
            total += w * (m * m)
    tl.store(out_ptr + n, tl.sum(tl.sum(total, axis=1), axis=0))


def score_self_triton(a: torch.Tensor, g: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij -> [N] fp32; a [N, T, I], g [N, T, O], W [O, I]."""
    a, g = a.contiguous(), g.contiguous()
    q_a, q_s = q_a.contiguous(), q_s.contiguous()  # eigh returns column-major eigenvectors
    w = weights.contiguous()
    n, t, i = a.shape
    o = g.shape[2]
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    if n == 0:
        return out
    if t == 0 or o == 0 or i == 0:
        return out.zero_()
    dot = _common.dot_code(a.dtype)
    rot_dtype = _common.storage_dtype(dot)
    # Rotated tokens in rows padded to multiples of ALIGN (zero columns, zero weights): aligned rows for the
    # kernel's pipelined loads.
    o_pad, i_pad = _common.round_up(o, _common.ALIGN), _common.round_up(i, _common.ALIGN)
    w = _common.padded(w, (o_pad, i_pad))
    q_s, q_a = _common.padded(q_s, (o_pad, o_pad)), _common.padded(q_a, (i_pad, i_pad))  # once, not per chunk
    block_o, block_i, block_t, warps = _blocks.pair_blocks(o_pad, i_pad, t, dot)
    per_example = t * (o_pad + i_pad) * torch.empty((), dtype=rot_dtype).element_size()
    step = _common.chunk_examples(n, per_example)
    for start in range(0, n, step):
        a_c, g_c = a[start:start + step], g[start:start + step]
        rows = a_c.shape[0] * t
        gs = rotate_tokens(g_c.reshape(rows, o), q_s, dot, square=False, out_dtype=rot_dtype, width=o_pad)
        as_ = rotate_tokens(a_c.reshape(rows, i), q_a, dot, square=False, out_dtype=rot_dtype, width=i_pad)
        _score_self_kernel[(a_c.shape[0],)](
            gs, as_, w, out[start:start + step], t, o_pad, i_pad,
            BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t, DOT=dot, ONE_CHUNK=t <= block_t, num_warps=warps,
        )
    return out
