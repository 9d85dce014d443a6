"""covariance: C = Σ_r m_r x_r x_rᵀ over token rows (the K-FAC factors A and S), a tiled SYRK.

Math (SOURCE_MATH.md §3 step 1, §7): x [R, D], optional row weights m [R] (bool or float, linear in
m as in `reference.covariance_ref`), C [D, D] symmetric. fp32 accumulation for fp16/bf16/fp32 x,
fp32 result.

Kernel: one program per unordered pair of D-tiles (bi ≤ bj) — only the upper triangle of tiles is
computed (half the flops of a GEMM) and each tile is stored twice, at (bi, bj) and transposed at
(bj, bi), so the result is exactly symmetric; a diagonal tile is symmetrised as (C + Cᵀ)/2. With
`out`, the kernel reproduces the torch backend's semantics out ← sym(out + C) in the same pass
(each program owns both mirrored tiles, so no two programs touch one element). Long row
reductions on a GPU are split into a fixed number of partial sums summed in a fixed order
(deterministic, no atomics).

Layout: rows whose width is not a multiple of ALIGN are copied into zero-padded rows first (the padding's
covariance entries are cut off), so that Triton can prove them aligned and pipeline the loads; with one tile
(D ≤ BLOCK_D, the memory-bound narrow case) the rows are read once, not as two operands. A test compiles the
kernel for sm_90 without a GPU and checks the build for asynchronous copies and wgmma.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _blocks, _common


@triton.jit
def _rows_product(x_ptr, y_ptr, m_ptr, rr, r_stop, stride_xr, offs_i, offs_j, D, part, DOT: tl.constexpr,
                  HAS_MASK: tl.constexpr, SHARE_ROWS: tl.constexpr):
    """part + x[rr, I]ᵀ (m y)[rr, J] for the rows rr below r_stop (fp32 accumulator)."""
    r_ok = rr < r_stop
    rows = rr.to(tl.int64) * stride_xr
    xi = tl.load(x_ptr + rows[:, None] + offs_i[None, :], mask=r_ok[:, None] & (offs_i[None, :] < D), other=0.0)
    if SHARE_ROWS:
        xj = xi
    else:
        xj = tl.load(y_ptr + rows[:, None] + offs_j[None, :], mask=r_ok[:, None] & (offs_j[None, :] < D),
                     other=0.0)
    if HAS_MASK:
        m = tl.load(m_ptr + rr, mask=r_ok, other=0.0)
        xj = xj.to(tl.float32) * m[:, None]
    return _common.mma(tl.trans(xi), xj, part, DOT)


@triton.jit
def _covariance_kernel(x_ptr, y_ptr, m_ptr, out_ptr, pairs_ptr, R, D, rows_per_split,
                       stride_xr, stride_os, stride_or,
                       BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK_R: tl.constexpr, DOT: tl.constexpr,
                       HAS_MASK: tl.constexpr, ACCUMULATE: tl.constexpr, SELECT_FLUSH: tl.constexpr,
                       SHARE_ROWS: tl.constexpr):
    """out[s, I, J] = Σ_{r in split s} m_r x[r, I]ᵀ y[r, J] for the tile pair (bi, bj) = pairs[pid], y = x or the
    launcher's mask-weighted copy of x (same strides).

    x operands are cast to the DOT dtype (x stays in its own precision; mask-weighted rows are
    rounded once to that dtype), accumulation in fp32. ACCUMULATE: out ← (out + outᵀ)/2 + C.
    SELECT_FLUSH (one D-tile: memory-bound): row chunks flushed by a select, else by a branch (see below).
    SHARE_ROWS (one D-tile and y = x): the J operand is the I operand, read once.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    bi = tl.load(pairs_ptr + 2 * pid)
    bj = tl.load(pairs_ptr + 2 * pid + 1)
    offs_i = bi * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = bj * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    r_start = split * rows_per_split
    r_stop = tl.minimum(r_start + rows_per_split, R)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    # Two-level sum: tensor-core accumulators lose low bits on every step (a 4M-row fp16 covariance came
    # out 0.4 % low on an H200 with one accumulator), so each CHUNK_R rows are summed apart, then added
    # to `acc` with ordinary fp32 rounding. One row loop either way, so the software pipeline keeps loads in flight
    # across chunks: as nested loops (a chunk of PROMOTE_STEPS = 4 steps inside) the sm_90 builds drained and
    # refilled the pipeline every chunk, which the H100 measured for the memory-bound narrow case before it became
    # one loop (2,289 GB/s after). The chunks and their order are the nested form's: the same bits.
    steps = CHUNK_R // BLOCK_R
    part = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for r0 in range(r_start, r_stop, BLOCK_R):
        part = _rows_product(x_ptr, y_ptr, m_ptr, r0 + offs_r, r_stop, stride_xr, offs_i, offs_j, D, part,
                             DOT, HAS_MASK, SHARE_ROWS)
        flush = ((r0 - r_start) // BLOCK_R) % steps == steps - 1
        if SELECT_FLUSH:
            # Memory-bound (one narrow tile): a select, so each step waits for its own dot, which costs
            # nothing next to the loads (the form the H100 measured).
            acc = tl.where(flush, acc + part, acc)
            part = tl.where(flush, 0.0, part)
        else:
            # Compute-bound: a branch, so only a chunk's last step waits for its dot (then adds and zeroes the
            # chunk sum); the other steps' dots overlap as in a nested loop (asynchronous wgmma: in the sm_90
            # build one wait with nothing pending, inside the branch).
            if flush:
                acc += part
                part = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    acc += part
    is_diag = bi == bj
    acc = tl.where(is_diag, (acc + tl.trans(acc)) * 0.5, acc)
    base = out_ptr + split * stride_os
    rows_i = offs_i.to(tl.int64) * stride_or
    rows_j = offs_j.to(tl.int64) * stride_or
    ptr_ij = base + rows_i[:, None] + offs_j[None, :]  # out[I, J] as [BLOCK_D(i), BLOCK_D(j)]
    ptr_ji = base + rows_j[None, :] + offs_i[:, None]  # out[J, I] viewed transposed, same layout
    mask = (offs_i[:, None] < D) & (offs_j[None, :] < D)
    if ACCUMULATE:
        old_ij = tl.load(ptr_ij, mask=mask, other=0.0)
        old_ji = tl.load(ptr_ji, mask=mask, other=0.0)
        acc = (old_ij + old_ji) * 0.5 + acc
    tl.store(ptr_ij, acc, mask=mask)
    tl.store(ptr_ji, acc, mask=mask & (bi != bj))


def _tile_pairs(tiles: int, device: torch.device) -> torch.Tensor:
    pairs = [(i, j) for i in range(tiles) for j in range(i, tiles)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1)


def auto_splits(r: int, d: int, block_r: int, n_pairs: int, device: torch.device) -> int:
    """Partial sums over rows: with few output tiles (small D, e.g. the memory-bound 2^24 x 32) up to
    two per SM, within the workspace bound of `_common.split_count`."""
    return _common.split_count(triton.cdiv(r, block_r), n_pairs, device, split_bytes=4 * max(d, 1) ** 2)


def _covariance(x: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor | None, splits: int | None) -> torch.Tensor:
    x = x.contiguous()
    r, d = x.shape
    m = None if mask is None else mask.to(torch.float32).contiguous()
    if d == 0:
        return out if out is not None else torch.zeros(0, 0, dtype=torch.float32, device=x.device)
    d_pad = _common.round_up(d, _common.ALIGN)
    aligned = _common.padded(x, (r, d_pad))
    if aligned is not x or (out is not None and (out.dtype != torch.float32 or not out.is_contiguous())):
        # Padded rows (their extra entries cut off), or an accumulator the kernel cannot update in place
        # (float64, strided): same semantics via a temporary.
        c = _covariance(aligned, m, None, splits)[:d, :d]
        if out is None:
            return c.contiguous()
        out.copy_((out + out.T) * 0.5 + c.to(out.dtype))
        return out
    dot = _common.dot_code(x.dtype)
    if m is not None and dot == _common.DOT_F32:
        # The in-kernel mask product makes the sm_90 build of the IEEE-fp32 kernel spill (255 registers plus a
        # stack frame, every tile shape tried); weighting the rows here first, in chunks of bounded memory,
        # gives the same fp32 products and the unmasked kernel.
        step = _common.chunk_examples(r, 4 * d)
        for start in range(0, r, step):
            xs = x[start:start + step]
            out = _covariance_rows(xs, xs * m[start:start + step, None], None, out, splits, dot)
        return out
    return _covariance_rows(x, x, m, out, splits, dot)


def _covariance_rows(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor | None, out: torch.Tensor | None,
                     splits: int | None, dot: int, select_flush: bool | None = None) -> torch.Tensor:
    """Σ_r m_r x_r y_rᵀ for aligned contiguous rows x, y [R, D] (y = x or a weighted copy), with `out` (fp32,
    contiguous) updated as sym(out) + C when given. select_flush: row chunks flushed by a select (default: for
    one tile, the memory-bound case) or a branch; both sum the same chunks in the same order."""
    r, d = x.shape
    block_d, block_r, warps = _blocks.covariance_blocks(r, d, x.element_size())
    tiles = triton.cdiv(d, block_d)
    pairs = _tile_pairs(tiles, x.device)
    n_pairs = pairs.numel() // 2
    if splits is None:
        splits = auto_splits(r, d, block_r, n_pairs, x.device)
    splits = max(1, min(int(splits), max(r, 1)))
    rows_per_split = triton.cdiv(max(r, 1), splits)
    rows_per_split = triton.cdiv(rows_per_split, block_r) * block_r
    splits = triton.cdiv(max(r, 1), rows_per_split)
    if splits == 1:
        target = out if out is not None else torch.empty(d, d, dtype=torch.float32, device=x.device)
        ws, accumulate = target.unsqueeze(0), out is not None
    else:
        ws, accumulate = torch.empty(splits, d, d, dtype=torch.float32, device=x.device), False
    _covariance_kernel[(n_pairs, splits)](
        x, y, m if m is not None else x, ws, pairs, r, d, rows_per_split,
        x.stride(0), ws.stride(0), ws.stride(1),
        BLOCK_D=block_d, BLOCK_R=block_r, CHUNK_R=block_r * _common.PROMOTE_STEPS, DOT=dot,
        HAS_MASK=m is not None, ACCUMULATE=accumulate,
        SELECT_FLUSH=tiles == 1 if select_flush is None else select_flush,
        SHARE_ROWS=tiles == 1 and y is x and _common.shares_dot_operands(x.device), num_warps=warps,
    )
    if splits == 1:
        return ws[0]
    c = ws.sum(0)  # fixed-order reduction of mirrored (hence exactly symmetric) partials
    if out is None:
        return c
    out.copy_((out + out.T) * 0.5 + c)
    return out


def covariance_triton(x: torch.Tensor, mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_r m_r x_r x_rᵀ over rows of x [R, D] -> [D, D] fp32, exactly symmetric.

    With `out` ([D, D]), returns `out` updated in place as sym(out + C) = (out + outᵀ)/2 + C, as
    the torch backend does. Accumulation fp32 (x in fp16/bf16/fp32).
    """
    return _covariance(x, mask, out, None)
