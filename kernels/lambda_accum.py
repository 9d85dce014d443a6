"""lambda_accum: EK-FAC eigenvalue correction Λ = Σ_n (Q_Sᵀ G_n Q_A)², G_n = Σ_t g_{n,t} a_{n,t}ᵀ.

Math (SOURCE_MATH.md §3 step 3, §7): a [N, T, I], g [N, T, O], Q_A [I, I], Q_S [O, O] (columns are
eigenvectors). With rotated tokens ĝ = g Q_S [N, T, O] and â = a Q_A [N, T, I],
Q_Sᵀ G_n Q_A = Σ_t ĝ_{n,t} â_{n,t}ᵀ =: M_n, and Λ = Σ_n M_n ⊙ M_n (a sum, not a mean).

Plan (per chunk of examples, sized by SOURCE_FAST_CHUNK_MIB):
1. rotate tokens with the batched GEMM of `_common.bmm` (N·T·(O² + I²) flops);
2. T == 1: M_n is rank one, so Λ = (ĝ²)ᵀ (â²): the rotation squares in its epilogue and one GEMM
   over n finishes (N·O·I flops);
   T > 1: the fused kernel below, one program per (O-tile, I-tile [, split of n]), accumulates M_n
   over T in registers, squares it and sums over n in registers (N·T·O·I flops). Per-example
   gradients (N·O·I numbers) are never written to memory.

Precision: accumulation fp32. Rotations and the fused tl.dot run in the input dtype for fp16/bf16
(eigenvectors are rounded to it, the rotated tokens are stored in it, as flash-attention does with
P before P·V) and in IEEE fp32 for fp32 inputs; squares and sums over n are always fp32 (the
T == 1 GEMM of squares takes fp32 operands, since squares overflow fp16: IEEE for fp32 inputs, TF32 for 16-bit
ones).

Determinism: no atomics. Each output tile is owned by one program that loops over n in order; on
a GPU with few output tiles the n range is split into a fixed number of partials summed in a fixed
order. Repeated calls are bitwise identical.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _blocks, _common


@triton.jit
def _lambda_accum_kernel(gs_ptr, as_ptr, out_ptr, N, T, O, I, n_per_split,
                         stride_os, stride_oo,
                         BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
                         DOT: tl.constexpr, ACCUMULATE: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """out[s, o, i] (+)= Σ_{n in split s} (Σ_t ĝ[n, t, o] â[n, t, i])² for one (O-tile, I-tile).

    ĝ [N·T, O] and â [N·T, I] are contiguous rotated tokens. M_n tiles stay in registers (fp32).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_o, offs_i, o_ok, i_ok = _common.pair_tile(pid, O, I, BLOCK_O, BLOCK_I)
    n_start = split * n_per_split
    n_stop = tl.minimum(n_start + n_per_split, N)
    row0 = n_start.to(tl.int64) * T  # int64 token-row offset of example n (N·T may pass 2^31)
    lam = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for n in range(n_start, n_stop):
        m = _common.example_grad_tile(gs_ptr, as_ptr, row0, T, O, I, offs_o, o_ok, offs_i, i_ok,
                                      BLOCK_O, BLOCK_I, BLOCK_T, DOT, ONE_CHUNK)
        lam += m * m
        row0 += T
    ptrs = out_ptr + split.to(tl.int64) * stride_os + offs_o.to(tl.int64)[:, None] * stride_oo + offs_i[None, :]
    mask = o_ok[:, None] & i_ok[None, :]
    if ACCUMULATE:
        lam += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, lam, mask=mask)


def rotate_tokens(x: torch.Tensor, q: torch.Tensor, dot: int, *, square: bool, out_dtype: torch.dtype,
                  width: int | None = None) -> torch.Tensor:
    """x [R, D] @ q [D, D] -> [R, D] in out_dtype (squared in fp32 before storing if `square`). With `width`
    (≥ D): x and q zero-padded to width (aligned rows, see _common.padded), so the result is [R, width] with
    zero columns beyond D."""
    if width is not None:
        x = _common.padded(x, (x.shape[0], width))
        q = _common.padded(q, (width, width))
    out = torch.empty(x.shape[0], q.shape[1], dtype=out_dtype, device=x.device)
    return _common.bmm(x.unsqueeze(0), q.unsqueeze(0), out.unsqueeze(0), dot=dot, square=square)[0]


def _accumulate_chunk(a, g, q_a, q_s, target, accumulate, dot):
    """target [O, I] fp32 contiguous (+)= Λ of this chunk of examples."""
    n, t, i = a.shape
    o = g.shape[2]
    # Rotated tokens in rows padded to multiples of ALIGN (zero columns, whose Λ entries are cut off): rows the
    # kernels' loads can be proved aligned in, so Triton pipelines them.
    o_pad, i_pad = _common.round_up(o, _common.ALIGN), _common.round_up(i, _common.ALIGN)
    if t == 1:
        gs2 = rotate_tokens(g.reshape(n, o), q_s, dot, square=True, out_dtype=torch.float32, width=o_pad)  # (ĝ)²
        as2 = rotate_tokens(a.reshape(n, i), q_a, dot, square=True, out_dtype=torch.float32, width=i_pad)  # (â)²
        # Squares of tokens rotated in 16 bits (16-bit inputs and eigenvectors): TF32's rounding (2^-11 relative)
        # is no larger than the error those already carry, and its tensor cores run the GEMM. fp32 inputs keep
        # IEEE fp32.
        squares_dot = _common.DOT_F32 if dot == _common.DOT_F32 else _common.DOT_TF32
        _common.bmm(gs2[:, :o].T.unsqueeze(0), as2[:, :i].unsqueeze(0), target.unsqueeze(0), dot=squares_dot,
                    accumulate=accumulate)
        return
    rot_dtype = _common.storage_dtype(dot)
    gs = rotate_tokens(g.reshape(n * t, o), q_s, dot, square=False, out_dtype=rot_dtype, width=o_pad)
    as_ = rotate_tokens(a.reshape(n * t, i), q_a, dot, square=False, out_dtype=rot_dtype, width=i_pad)
    block_o, block_i, block_t, launch = _blocks.pair_blocks(o_pad, i_pad, t, dot)
    tiles = triton.cdiv(o_pad, block_o) * triton.cdiv(i_pad, block_i)
    splits = _common.split_count(n, tiles, a.device, split_bytes=4 * o_pad * i_pad)
    n_per_split = triton.cdiv(n, splits)
    splits = triton.cdiv(n, n_per_split)
    direct = splits == 1 and (o_pad, i_pad) == (o, i)  # the kernel writes `target` itself
    if direct:
        ws, acc_flag = target.unsqueeze(0), accumulate
    else:
        ws, acc_flag = torch.empty(splits, o_pad, i_pad, dtype=torch.float32, device=a.device), False
    _lambda_accum_kernel[(tiles, splits)](
        gs, as_, ws, n, t, o_pad, i_pad, n_per_split, ws.stride(0), ws.stride(1),
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t, DOT=dot, ACCUMULATE=acc_flag, ONE_CHUNK=t <= block_t,
        **launch,
    )
    if not direct:
        partial = (ws[0] if splits == 1 else ws.sum(0))[:o, :i]  # fixed order
        if accumulate:
            target.add_(partial)
        else:
            target.copy_(partial)


def lambda_accum_triton(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_n (Q_Sᵀ G_n Q_A)² -> [O, I] fp32; a [N, T, I], g [N, T, O] (fp16/bf16/fp32).

    With `out` ([O, I], fp32 or float64), returns `out` with the sum added in place (a float64
    `out` receives the fp32 result of this call).
    """
    a, g = a.contiguous(), g.contiguous()
    n, t, i = a.shape
    o = g.shape[2]
    # eigh returns column-major eigenvectors; padded once here, not per chunk (zero rows and columns)
    q_a = _common.padded(q_a.contiguous(), (_common.round_up(i, _common.ALIGN),) * 2)
    q_s = _common.padded(q_s.contiguous(), (_common.round_up(o, _common.ALIGN),) * 2)
    dot = _common.dot_code(a.dtype)
    direct = out is not None and out.dtype == torch.float32 and out.is_contiguous()
    target = out if direct else torch.empty(o, i, dtype=torch.float32, device=a.device)
    accumulate = direct
    if n == 0 or t == 0 or target.numel() == 0:
        if not accumulate:
            target.zero_()
    else:
        # rotated tokens per example: squared fp32 when T == 1, else in the dot dtype
        rot_bytes = 4 if t == 1 else torch.empty((), dtype=_common.storage_dtype(dot)).element_size()
        per_example = t * (o + i) * rot_bytes
        step = _common.chunk_examples(n, per_example)
        for start in range(0, n, step):
            _accumulate_chunk(a[start:start + step], g[start:start + step], q_a, q_s, target, accumulate, dot)
            accumulate = True
    if out is None or direct:
        return target
    out.add_(target.to(out.dtype))
    return out
