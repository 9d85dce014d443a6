"""score_self: self-influence of one EK-FAC operator, s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij.

Math (SOURCE_MATH.md §3-4, self-influence): a [N, T, I], g [N, T, O], Q_S [O, O], Q_A [I, I],
W = f(Λ) [O, I]. With rotated tokens ĝ = g Q_S and â = a Q_A, M_n = Q_Sᵀ G_n Q_A = Σ_t ĝ_{n,t} â_{n,t}ᵀ
and s[n] = Σ_ij W_ij M_n[i, j]² = ⟨G_n, f(H) G_n⟩.

Same structure as lambda_accum's fused kernel, weighted and not reduced over n: the tokens are
rotated once by the batched GEMM of `_common.bmm` (N·T·(O² + I²) flops), then one program per
(O-tile, I-tile [, split of n]) loads its W tile once, keeps it in registers, and walks the examples:
it forms each M_n tile over T in registers (N·T·O·I flops), reduces W ⊙ M_n² to one number and writes
it to a [tiles, N] workspace, which a fixed-order sum over tiles turns into s (deterministic, no
atomics). M_n is never written to memory. T == 1 needs no special case: the rank-one M_n tile is a
K = 1 (masked) tl.dot, N·O·I flops in total.

History: until the ninth session one program per example walked the tiles and read every W tile
for every example: 4 bytes per weight per example, 0.3 bytes per multiply-add at T = 16 (the sm_90
build table, benchmarks/results/sm90_builds.md), several times what L2 can feed. Now W is read once
per program.

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
def _score_self_kernel(gs_ptr, as_ptr, w_ptr, ws_ptr, N, T, O, I, n_per_split, stride_wst,
                       BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, DOT: tl.constexpr,
                       ONE_CHUNK: tl.constexpr):
    """ws[tile, n] = Σ_{(o, i) in tile} W[o, i] (Σ_t ĝ[n, t, o] â[n, t, i])² for the (O-tile, I-tile) tile =
    program_id(0) and the examples of split program_id(1). ĝ [N·T, O], â [N·T, I], W [O, I] contiguous; ws has
    row stride stride_wst."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_o, offs_i, o_ok, i_ok = _common.pair_tile(pid, O, I, BLOCK_O, BLOCK_I)
    w = tl.load(w_ptr + offs_o.to(tl.int64)[:, None] * I + offs_i[None, :], mask=o_ok[:, None] & i_ok[None, :],
                other=0.0).to(tl.float32)  # this tile's weights, for every example
    n_start = split * n_per_split
    n_stop = tl.minimum(n_start + n_per_split, N)
    row0 = n_start.to(tl.int64) * T  # int64 token-row offset of example n (N·T may pass 2^31)
    out_row = ws_ptr + pid.to(tl.int64) * stride_wst
    for n in range(n_start, n_stop):
        m = _common.example_grad_tile(gs_ptr, as_ptr, row0, T, O, I, offs_o, o_ok, offs_i, i_ok,
                                      BLOCK_O, BLOCK_I, BLOCK_T, DOT, ONE_CHUNK)
        tl.store(out_row + n, tl.sum(tl.sum(w * (m * m), axis=1), axis=0))
        row0 += T


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
    # no register cap: 79 registers uncapped, 95 capped (PAIR_GPU_BLOCKS)
    block_o, block_i, block_t, launch = _blocks.pair_blocks(o_pad, i_pad, t, dot, cap_registers=False)
    tiles = triton.cdiv(o_pad, block_o) * triton.cdiv(i_pad, block_i)
    per_example = t * (o_pad + i_pad) * rot_dtype.itemsize + 4 * tiles
    step = _common.chunk_examples(n, per_example)
    for start in range(0, n, step):
        a_c, g_c = a[start:start + step], g[start:start + step]
        n_c = a_c.shape[0]
        rows = n_c * t
        gs = rotate_tokens(g_c.reshape(rows, o), q_s, dot, square=False, out_dtype=rot_dtype, width=o_pad)
        as_ = rotate_tokens(a_c.reshape(rows, i), q_a, dot, square=False, out_dtype=rot_dtype, width=i_pad)
        splits = _common.split_count(n_c, tiles, a.device)
        n_per_split = triton.cdiv(n_c, splits)
        ws = torch.empty(tiles, n_c, dtype=torch.float32, device=a.device)
        _score_self_kernel[(tiles, triton.cdiv(n_c, n_per_split))](
            gs, as_, w, ws, n_c, t, o_pad, i_pad, n_per_split, ws.stride(0),
            BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t, DOT=dot, ONE_CHUNK=t <= block_t,
            **launch,
        )
        torch.sum(ws, dim=0, out=out[start:start + step])  # a fixed-order sum over tiles: deterministic
    return out
