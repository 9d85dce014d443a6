"""score_pairwise: scores[q, n] = ⟨V_q, G_n⟩ = Σ_t g_{n,t}ᵀ V_q a_{n,t}; all of G_n never in global memory.

Math (SOURCE_MATH.md §7): v [Q, O, I] (preconditioned query directions), a [N, T, I], g [N, T, O],
G_n = Σ_t g_{n,t} a_{n,t}ᵀ [O, I]; result [Q, N] fp32.

Four forms, by the number of tokens (`_blocks.PAIRWISE_TOKENWISE_GPU`, `_blocks.pairwise_materializes`,
`_blocks.pairwise_mma_formed_blocks`):
  - the token-wise GEMM of score_per_token, VA = a V_qᵀ contracted with g in its epilogue (score_per_token.py;
    the default for fp32 one-token inputs);
  - the kernel below forming G_n tiles on chip (the fp16/bf16 default up to the several-token config's max_t);
  - more tokens: G_n formed in memory, a chunk of examples at a time, by a GEMM over the tokens
    (`_common.bmm`), and contracted by the same kernel reading G instead of forming it (GIVEN). Forming on chip
    costs T multiply-adds per G element on the CUDA cores against BLOCK_Q on the tensor cores; in memory, the
    GEMM streams G once more;
  - or, for 16-bit inputs of up to 16 tokens where `_blocks.PAIRWISE_MMA_FORMED_GPU_BLOCKS` turns it on (off until
    a GPU times it), G tiles formed on chip by the tensor cores (`_score_pairwise_mma_kernel`, below the main
    kernel): the materialised form's two GEMMs fused, G never in memory.

Strategy: the contraction is a GEMM, scores = G_flat [N, O·I] @ V_flat [Q, O·I]ᵀ, whose left operand is
formed on chip. One program per (block of BLOCK_N examples, block of BLOCK_Q queries). Loop nest:
  input columns i in blocks of BLOCK_I: the examples' a[n, t, i-block] (up to BLOCK_T tokens) loaded once,
  kept in registers
    output rows o (the innermost loop, long: O steps): load V[q-block, o, i-block] and g[o, t, n-block],
    form G[n, o, i-block] = Σ_t g a in fp32 registers, add G_tile @ V_tileᵀ to the [BLOCK_N, BLOCK_Q]
    fp32 accumulator with tl.dot (wgmma on sm_90).
The innermost loop has only loads, the forming and the dot, so Triton software-pipelines it (asynchronous
copies of the V tiles, num_stages deep). That needs the loads to be provably aligned: the launcher pads the i
axis of v and a to a multiple of ALIGN (zeros, which add nothing) and stores g as [O, T, N_pad] so that each
step's g is one contiguous vector, loaded one step ahead. The formed tile is the dot's left operand, which
wgmma reads from registers: no shared-memory round trip per step. Only V streams from memory, 2 / BLOCK_N
bytes per multiply-add (the token-wise GEMM streams 2 / BLOCK_M + 2 / BLOCK_O), which is what lets a wide
example block keep the tensor cores fed from L2. A test compiles the kernel for sm_90 without a GPU and checks
the build for tensor-core (HGMMA) and asynchronous-copy (LDGSTS) instructions and no spills.

The materialised form (GIVEN) runs the same loop nest with the G tile loaded instead of formed: a plain GEMM
streaming 2/BLOCK_N + 2/BLOCK_Q bytes per multiply-add, G_n padded to I_pad columns (zeros) so its rows align.
Either stage may instead run torch's GEMM on the same chunk (cuBLAS on a GPU) where the measured tables say so
(`_blocks.PAIRWISE_MATERIALIZED_TORCH`, off by default): both stages are plain GEMMs, so the kernels' part there is
the chunking, the layout and the choice.

Grid: axis 0 = example blocks (fastest), so the programs resident together share one query block and read
the same V tiles in the same order (L2 hits); axis 1 = query blocks; axis 2 = splits of the contraction into
ranges of the inputs i and of the output rows o, used when the example and query blocks alone fill the GPU's
SMs badly (a 256 × 128 tile gives one program per 32 768 scores; `split_contraction` models the waves), each
writing its own partial, summed in a fixed order. Each partial is written once, by its own program:
deterministic, no atomics.

History: the first kernel (until 2026-11-26) contracted each on-chip G_n tile with the queries by
elementwise FMAs and ran at 1.2-1.9 TFLOP/s on an H200 (benchmarks/results/ops_nvidia_h200.md, whose
triton score_pairwise rows are that kernel's). The second formed G
tiles for a tl.dot but kept a token loop innermost and read unaligned rows: its sm_90 build had neither
pipelining nor vectorised loads. The third had this loop nest with G as the right operand (stored to shared
memory every step, each step's wgmma waited for before the next) and g loaded in the step that used it. The
fourth (this loop nest) ran on an H100 on 2026-11-26 at 597-625 TFLOP/s for one token (bf16, Q = 512, N = 8192,
O·I = 1024 × 1025, benchmarks/results/ops_nvidia_h100_80gb_hbm3.md); with 16 tokens its inner token loop
(since replaced by the materialised form) re-read the inputs every o step: 22 TFLOP/s.

Precision: with v, a and g all fp16 (or all bf16) the fp32 G tile is rounded to that dtype for the
contraction (fp32 accumulation), as a same-precision computation would; otherwise every dot is IEEE fp32
(never TF32). Output fp32.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from source_fast import _torch_ops
# Examples per chunk of materialised G_n (at least 2·Q and one example block, within a quarter of free memory): the
# same rule as the torch backend's on a GPU. A module attribute, so tests can fix the chunk.
from source_fast._torch_ops import materialized_examples

from . import _blocks, _common
from .score_per_token import tokenwise_scores


@triton.jit
def _load_inputs(a_rows, s_at, t0, tt, t_ok, ii, i_ok, n_ok, BLOCK_T: tl.constexpr):
    """The examples' inputs a[n, t0 + t, ii] in fp32: [BLOCK_N, BLOCK_I] for one token, else [BLOCK_N, BLOCK_T,
    BLOCK_I]."""
    if BLOCK_T == 1:
        a = tl.load(a_rows[:, None] + t0 * s_at + ii[None, :], mask=n_ok[:, None] & i_ok[None, :], other=0.0)
    else:
        a = tl.load(a_rows[:, None, None] + tt[None, :, None].to(tl.int64) * s_at + ii[None, None, :],
                    mask=n_ok[:, None, None] & t_ok[None, :, None] & i_ok[None, None, :], other=0.0)
    return a.to(tl.float32)


@triton.jit
def _load_g(gt_ptr, o, s_go, s_gt, t0, tt, t_ok, offs_n, n_ok, BLOCK_T: tl.constexpr):
    """g[o, t, n-block] from the [O, T, N] view: [BLOCK_N] for one token, else [BLOCK_N, BLOCK_T]."""
    if BLOCK_T == 1:
        g = tl.load(gt_ptr + o * s_go + t0 * s_gt + offs_n, mask=n_ok, other=0.0)
    else:
        g = tl.load(gt_ptr + o * s_go + tt[None, :].to(tl.int64) * s_gt + offs_n[:, None],
                    mask=n_ok[:, None] & t_ok[None, :], other=0.0)
    return g


@triton.jit
def _form_grad(g, a, BLOCK_T: tl.constexpr):
    """G[n, o, ii] = Σ_t g[o, t, n] a[n, t, ii] in fp32 for one o (g from `_load_g`, a from `_load_inputs`)."""
    if BLOCK_T == 1:
        grad = g.to(tl.float32)[:, None] * a
    else:
        grad = tl.sum(g.to(tl.float32)[:, :, None] * a, axis=1)
    return grad


@triton.jit
def _split_ranges(split, i_splits, i_per_split, o_per_split, I, O):
    """(i_start, i_stop, o_start, o_stop) of a split: program_id(2) = (o-split) · i_splits + (i-split)."""
    i_start = (split % i_splits) * i_per_split
    o_start = (split // i_splits) * o_per_split
    return i_start, tl.minimum(i_start + i_per_split, I), o_start, tl.minimum(o_start + o_per_split, O)


@triton.jit
def _score_pairwise_kernel(v_ptr, a_ptr, gt_ptr, out_ptr, Q, N, T, O, I, i_per_split, o_per_split, i_splits,
                           s_vq, s_vo, s_an, s_at, s_go, s_gt, s_os, s_oq,
                           BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
                           BLOCK_T: tl.constexpr, GIVEN: tl.constexpr, DOT: tl.constexpr):
    """out[split, qb, nb] = (G[nb] V[qb]ᵀ)ᵀ over the flattened (o, i) axis, for the query block program_id(1), the
    example block program_id(0) and the split program_id(2) = (o-split) · i_splits + (i-split): i in the split's
    i_per_split inputs, o in its o_per_split output rows. Unit strides: v and a along i, gt ([O, T, N] view of
    g) along n, out along n; the other strides are arguments (in elements).
    Formed (GIVEN false, T ≤ BLOCK_T): the inputs are held in registers across the o loop, which has only loads,
    the forming and the dot (pipelined). GIVEN: a_ptr holds G itself, [N, O, I] with strides s_an (example) and
    s_at (output row), and each o step loads its tile: a plain GEMM (gt_ptr, T and BLOCK_T unused)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_i = tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    n_ok = offs_n < N
    q_ok = offs_q < Q
    a_rows = a_ptr + offs_n * s_an  # [BLOCK_N] example bases (int64 offsets: N·T·I may pass 2^31)
    v_rows = v_ptr + offs_q * s_vq
    s_go = s_go.to(tl.int64)  # o · s_go spans g's [O, T, N_pad] view, which may pass 2^31 elements
    split = tl.program_id(2)
    i_start, i_stop, o_start, o_stop = _split_ranges(split, i_splits, i_per_split, o_per_split, I, O)
    acc = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
    for i0 in range(i_start, i_stop, BLOCK_I):
        ii = i0 + offs_i
        i_ok = ii < I
        if not GIVEN:  # the examples' inputs for this i-block: loaded once, reused by all O steps
            a = _load_inputs(a_rows, s_at, 0, offs_t, offs_t < T, ii, i_ok, n_ok, BLOCK_T)
            # g is loaded one o step ahead: its load is too small for an asynchronous copy, so this hides its
            # latency behind a step's dot instead of stalling every step.
            g_next = _load_g(gt_ptr, o_start, s_go, s_gt, 0, offs_t, offs_t < T, offs_n, n_ok, BLOCK_T)
        for o in range(o_start, o_stop):
            v = tl.load(v_rows[:, None] + o * s_vo + ii[None, :], mask=q_ok[:, None] & i_ok[None, :], other=0.0)
            if GIVEN:
                grad = tl.load(a_rows[:, None] + o * s_at + ii[None, :], mask=n_ok[:, None] & i_ok[None, :],
                               other=0.0)
            else:
                g = g_next
                g_next = _load_g(gt_ptr, o + 1, s_go, s_gt, 0, offs_t, offs_t < T, offs_n, n_ok & (o + 1 < o_stop),
                                 BLOCK_T)
                grad = _form_grad(g, a, BLOCK_T)
            # The formed tile is the dot's left operand: on sm_90 wgmma reads it from registers, so it never goes
            # through shared memory (as a right operand it would be stored there every step).
            acc = _common.mma(grad, tl.trans(v), acc, DOT)
    out_ptr += split.to(tl.int64) * s_os
    tl.store(out_ptr + offs_q[None, :] * s_oq + offs_n[:, None], acc, mask=n_ok[:, None] & q_ok[None, :])


@triton.jit
def _block_inputs(a_rows, s_at, offs_t, t_ok, i0, offs_i, n_ok):
    """a[n-block, :, i0 + offs_i] as stored (16-bit, the forming dot's right operand), tokens past T zero."""
    return tl.load(a_rows[:, None, None] + offs_t[None, :, None] * s_at + (i0 + offs_i)[None, None, :],
                   mask=n_ok[:, None, None] & t_ok[None, :, None], other=0.0)


@triton.jit
def _mma_formed_step(acc, a, g_rows, v_rows, i0, o0, oc_stop, s_go, s_vo, offs_o, offs_t, k_o, k_i, n_ok, q_ok, t_ok,
                     BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, ASYNC_G: tl.constexpr):
    """acc + G[n-block, o-tile, i-block] V[q-block, o-tile, i-block]ᵀ over the flattened (o, i) pairs, the G tile
    formed from a (the examples' inputs a[n-block, :, i-block]) and g[n-block, o-tile, :] by a batched dot over
    the tokens."""
    o_ok = (o0 + offs_o) < oc_stop
    # g's [N, O, BLOCK_T] layout (tokens contiguous, zero-padded) builds without spills; from [N, T, O] (output
    # rows contiguous) the sm_90 build spilled 784 B.
    g_at = g_rows[:, None, None] + (o0 + offs_o)[None, :, None] * s_go + offs_t[None, None, :]
    if ASYNC_G:
        g = tl.load(g_at, mask=n_ok[:, None, None] & o_ok[None, :, None], other=0.0)
    else:
        g = tl.load(g_at, mask=n_ok[:, None, None] & o_ok[None, :, None] & t_ok[None, None, :], other=0.0)
    grad = tl.dot(g, a)  # [BLOCK_N, BLOCK_O, BLOCK_I], fp32 accumulation (mma.sync)
    grad = tl.reshape(grad.to(v_rows.dtype.element_ty), (BLOCK_N, BLOCK_O * BLOCK_I))
    v = tl.load(v_rows[:, None] + (o0 + k_o)[None, :] * s_vo + (i0 + k_i)[None, :],
                mask=q_ok[:, None] & ((o0 + k_o) < oc_stop)[None, :], other=0.0)
    # G as the left operand, as in the main kernel: wgmma reads it from registers
    return tl.dot(grad, tl.trans(v), acc)


@triton.jit
def _score_pairwise_mma_kernel(v_ptr, a_ptr, g_ptr, out_ptr, Q, N, T, O, I, i_per_split, o_per_split, i_splits,
                               o_chunk, s_vq, s_vo, s_an, s_at, s_gn, s_go, s_os, s_oq,
                               BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                               BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, ASYNC_G: tl.constexpr,
                               FLAT: tl.constexpr):
    """The fused materialised form: out[split, qb, nb] as `_score_pairwise_kernel`'s, with each step's G tile formed
    on the tensor cores. A step covers BLOCK_O output rows × BLOCK_I inputs: G[n, o-tile, i-block] =
    g[n, o-tile, :] @ a[n, :, i-block] for the BLOCK_N examples at once (a batched dot, K = the tokens, zero-padded
    to BLOCK_T), rounded to the inputs' 16-bit dtype, flattened to [BLOCK_N, BLOCK_O · BLOCK_I] and contracted
    with the queries' V[q-block, o-tile, i-block] flattened the same way (wgmma). Forming costs BLOCK_T
    multiply-adds per G element against BLOCK_Q for the contraction, both on the tensor cores, where the
    CUDA-core forming of the main kernel pays T FMAs per element and the materialised form writes and reads G.
    Loop nest: chunks of o_chunk output rows outside; inside a chunk its (i-block, output-row tile) steps, as one
    pipelined loop (FLAT: a[n-block, :, i-block] loaded every step) or nested (a loaded once per i-block, the
    tiles' loop pipelined); each step loads g and V and runs the two dots. 16-bit v, a, g of one dtype;
    unit strides: v, a along i, g ([N, O, BLOCK_T]) along t, out along n; the i axis padded to a multiple of
    BLOCK_I (no i masks).
    ASYNC_G: g's loads as asynchronous copies in the software pipeline (16-byte vectors, one more shared-memory
    buffer per stage), else plain loads masked by token (g's padding is zero either way), which Triton cannot
    vectorise and so leaves out of the pipeline: fewer registers and less shared memory, more load instructions.
    FLAT: the input blocks and output-row tiles of a chunk in one loop (a loaded every step) instead of nested."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_t = tl.arange(0, BLOCK_T)
    offs_o = tl.arange(0, BLOCK_O)
    offs_i = tl.arange(0, BLOCK_I)
    # the contraction's K axis within a step: (o, i) pairs, o-major, as the formed tile is flattened
    k_o = tl.arange(0, BLOCK_O * BLOCK_I) // BLOCK_I
    k_i = tl.arange(0, BLOCK_O * BLOCK_I) % BLOCK_I
    n_ok = offs_n < N
    q_ok = offs_q < Q
    t_ok = offs_t < T
    a_rows = a_ptr + offs_n * s_an  # int64 offsets: N·T·I may pass 2^31
    g_rows = g_ptr + offs_n * s_gn
    v_rows = v_ptr + offs_q * s_vq
    split = tl.program_id(2)
    i_start, i_stop, o_start, o_stop = _split_ranges(split, i_splits, i_per_split, o_per_split, I, O)
    acc = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
    # Output rows in chunks of o_chunk, outermost: a program re-reads its g[n-block, chunk, :] once per input block,
    # and a chunk small enough stays in L2 across them (all of O per program would stream g from memory
    # I / BLOCK_I times); each chunk reads the inputs a once more.
    for oc in range(o_start, o_stop, o_chunk):
        oc_stop = tl.minimum(oc + o_chunk, o_stop)
        if FLAT:
            # One loop over the chunk's (input block, output-row tile) steps: a is loaded every step (the same
            # tile for a block's o_chunk / BLOCK_O steps, from L2), and the pipeline never drains inside a chunk.
            tiles = tl.cdiv(oc_stop - oc, BLOCK_O)
            for step in range(0, tl.cdiv(i_stop - i_start, BLOCK_I) * tiles):
                i0 = i_start + (step // tiles) * BLOCK_I
                a = _block_inputs(a_rows, s_at, offs_t, t_ok, i0, offs_i, n_ok)
                acc = _mma_formed_step(acc, a, g_rows, v_rows, i0, oc + (step % tiles) * BLOCK_O, oc_stop, s_go,
                                       s_vo, offs_o, offs_t, k_o, k_i, n_ok, q_ok, t_ok, BLOCK_N, BLOCK_O, BLOCK_I,
                                       ASYNC_G)
        else:
            # Nested: a loaded once per input block; the pipeline refills every o_chunk / BLOCK_O steps.
            for i0 in range(i_start, i_stop, BLOCK_I):
                a = _block_inputs(a_rows, s_at, offs_t, t_ok, i0, offs_i, n_ok)
                for o0 in range(oc, oc_stop, BLOCK_O):
                    acc = _mma_formed_step(acc, a, g_rows, v_rows, i0, o0, oc_stop, s_go, s_vo, offs_o, offs_t, k_o,
                                           k_i, n_ok, q_ok, t_ok, BLOCK_N, BLOCK_O, BLOCK_I, ASYNC_G)
    out_ptr += split.to(tl.int64) * s_os
    tl.store(out_ptr + offs_q[None, :] * s_oq + offs_n[:, None], acc, mask=n_ok[:, None] & q_ok[None, :])


def _kernel_layout(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor):
    """(v [Q, O, I_pad], a [N, T, I_pad], gt [O, T, N_pad], I_pad): the i axis padded with zeros to a multiple of
    ALIGN, g transposed so that a step's g[o, t, n-block] is contiguous; no copy where a tensor already has
    that layout."""
    i_pad = _common.round_up(a.shape[2], _common.ALIGN)
    v = _common.aligned_rows(v, i_pad)
    a = _common.aligned_rows(a, i_pad)
    gt = _common.aligned_rows(g.permute(2, 1, 0), _common.round_up(g.shape[0], _common.ALIGN))
    return v, a, gt, i_pad


def _contract(vk: torch.Tensor, ak: torch.Tensor, gt: torch.Tensor, out: torch.Tensor, t: int, o: int,
              i_pad: int, cfg: _blocks.PairwiseConfig, dot: int, given: bool) -> None:
    """out [Q, N] (unit stride along N) = the kernel's contraction of vk [Q, O, I_pad] with the examples: inputs ak
    [N, T, I_pad] and gt [O, T, N_pad] formed on chip, or (given) G itself in ak, [N, O, I_pad]."""
    q, n = out.shape
    grid_n, i_per_split, i_splits, o_per_split, o_splits = contraction_grid(q, n, o, i_pad, cfg, ak.device)

    def launch(vq, wq):
        _score_pairwise_kernel[(grid_n, triton.cdiv(vq.shape[0], cfg.block_q), i_splits * o_splits)](
            vq, ak, gt, wq, vq.shape[0], n, t, o, i_pad, i_per_split, o_per_split, i_splits,
            vq.stride(0), vq.stride(1), ak.stride(0), ak.stride(1), gt.stride(0), gt.stride(1), wq.stride(0),
            wq.stride(1),
            BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, BLOCK_I=cfg.block_i, BLOCK_T=cfg.block_t, GIVEN=given, DOT=dot,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    _launch_by_query_range(launch, vk, out, i_splits * o_splits, cfg.block_q)


def _launch_by_query_range(launch, vk: torch.Tensor, out: torch.Tensor, splits: int, block_q: int) -> None:
    """launch(v rows, partials [splits, rows, N]) over ranges of queries that grid axis 1 can hold (65535 blocks),
    into out [Q, N] itself or, with splits > 1, into a workspace of partials summed in a fixed order
    (deterministic)."""
    q, n = out.shape
    ws = out.unsqueeze(0) if splits == 1 else torch.empty(splits, q, n, dtype=torch.float32, device=out.device)
    step = block_q * _common.MAX_GRID_YZ
    for q0 in range(0, q, step):
        launch(vk[q0:q0 + step], ws[:, q0:q0 + step])
    if splits > 1:
        out.copy_(torch.sum(ws, dim=0))


MIN_O_STEPS = 32  # output rows per split at least: each program's pipelined o loop stays long
# A program's fixed cost in steps (one step: an input block × one output row): storing its [BLOCK_N, BLOCK_Q]
# fp32 partial takes about 10 steps' time at an H100's tensor-core rate and per-SM share of bandwidth, plus the
# pipeline's fill. An estimate, not a measurement: it keeps small shapes from splitting into tiny programs.
PROGRAM_OVERHEAD_STEPS = 16


@functools.lru_cache(maxsize=1024)
def _fewest_waves(tiles: int, i_blocks: int, o: int, slots: int, max_splits: int,
                  min_o: int) -> tuple[int, int, int, int]:
    """(input blocks per split, input splits, output rows per split, output splits) minimising the kernel's time
    modelled as waves × one program's time: ceil(programs / slots) · (input blocks · output rows +
    PROGRAM_OVERHEAD_STEPS), with at most max_splits partials; ties go to fewer splits (less workspace to sum)."""
    best = None
    for i_per in sorted({-(-i_blocks // k) for k in range(1, i_blocks + 1)}, reverse=True):
        i_splits = -(-i_blocks // i_per)
        if i_splits > max_splits:
            break
        for wanted in range(1, max(1, min(max_splits // i_splits, o // max(min_o, 1))) + 1):
            o_per = -(-o // wanted)
            o_splits = -(-o // o_per)
            cost = (-(-tiles * i_splits * o_splits // slots) * (i_per * o_per + PROGRAM_OVERHEAD_STEPS),
                    i_splits * o_splits)
            if best is None or cost < best[0]:
                best = (cost, (i_per, i_splits, o_per, o_splits))
    return best[1]


def split_contraction(tiles: int, i_pad: int, o: int, block_i: int, outputs: int,
                      device: torch.device) -> tuple[int, int, int, int]:
    """(i_per_split, i_splits, o_per_split, o_splits) of the contraction over (o, i): partials over ranges of the
    inputs i and of the output rows o, summed in a fixed order (deterministic), within the workspace bound. The
    split minimises waves × per-program work for the device's SMs (one program per SM: the 16-bit builds take
    over 128 registers at 8 warps). Before, the inputs alone were split towards two programs per SM: 17 input
    blocks of 64 then capped a 1024-wide layer at 17 programs for a materialised chunk of few queries (the H100
    run of 2026-11-26 had Q = 64 at 0.47x torch so), and wave tails were ignored (Q = 512, T = 16: 272 programs
    in 3 waves for 2.06 waves of work)."""
    i_blocks = triton.cdiv(i_pad, block_i)
    if not _common.splits_allowed(device):
        return i_blocks * block_i, 1, o, 1
    max_splits = max(1, _common.WORKSPACE_BYTES // (4 * outputs))
    i_per, i_splits, o_per, o_splits = _fewest_waves(tiles, i_blocks, o, _common.num_sms(device), max_splits,
                                                     MIN_O_STEPS)
    return i_per * block_i, i_splits, o_per, o_splits


class MaterializedPlan(NamedTuple):
    """How `_materialized_scores` runs: the query directions as the contraction reads them, the padded input width,
    the contraction's tile, the examples per chunk with that chunk's G buffer, and which stages run torch's GEMM
    (`_blocks.PAIRWISE_MATERIALIZED_TORCH`). Either contraction reads v and G rows padded to i_pad columns (zeros,
    never written by the forming): aligned rows for the kernel's loads and for the forming's stores, and for
    torch's GEMM a K of O·i_pad, at most 15 columns per row more."""
    vk: torch.Tensor
    i_pad: int
    cfg: _blocks.PairwiseConfig
    step: int
    grads: torch.Tensor
    torch_form: bool = False
    torch_contract: bool = False


def _torch_may_run(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch's GEMMs may run a materialised stage: in the kernels' precision, 16-bit operands with fp32
    accumulation (and, for the contraction, an fp32 result: `has_fp32_out_mm` on a GPU; the CPU, where the
    interpreter's tests run, upcasts to fp32), and without an error under torch's deterministic mode (cuBLAS then
    needs CUBLAS_WORKSPACE_CONFIG; the kernels are deterministic anyway). fp32 G stays with the kernels: torch's
    fp32 GEMM follows the process's TF32 setting."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    if device.type == "cpu":
        return True
    if torch.are_deterministic_algorithms_enabled() and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        return False
    return _torch_ops.has_fp32_out_mm(device, dtype)


def contraction_grid(q: int, n: int, o: int, i_pad: int, cfg: _blocks.PairwiseConfig | _blocks.MmaFormedConfig,
                     device: torch.device) -> tuple[int, int, int, int, int]:
    """(example blocks, i_per_split, i_splits, o_per_split, o_splits) of a contraction of Q queries with N examples
    over o output-row steps at tile cfg (either kernel's): the grid is example blocks × query blocks × i_splits ·
    o_splits."""
    grid_n = triton.cdiv(n, cfg.block_n)
    return (grid_n, *split_contraction(grid_n * triton.cdiv(q, cfg.block_q), i_pad, o, cfg.block_i, q * n, device))


def materialized_plan(v: torch.Tensor, a: torch.Tensor, dot: int) -> MaterializedPlan:
    """The chunking and buffers of the materialised form for these inputs (also what
    benchmarks/profile_pairwise_materialized.py times stage by stage)."""
    q, o, i = v.shape
    n = a.shape[0]
    half = _common.storage_dtype(dot)
    by_torch = _torch_may_run(half, a.device)
    torch_form = by_torch and _blocks.materialized_by_torch("form")
    torch_contract = by_torch and _blocks.materialized_by_torch("contract")
    i_pad = _common.round_up(i, _common.ALIGN)
    cfg = _blocks.pairwise_materialized_blocks(q, n, i_pad, dot)
    free = torch.cuda.mem_get_info(a.device)[0] if a.device.type == "cuda" else None
    step = materialized_examples(q, n, o * i_pad * half.itemsize, cfg.block_n, free)
    grads = torch.empty(step, o, i_pad, dtype=half, device=a.device)
    grads[..., i:].zero_()  # the padding columns, never written by the forming GEMM: zeros add nothing
    vk = _common.aligned_rows(v, i_pad)
    return MaterializedPlan(vk, i_pad, cfg, step, grads, torch_form, torch_contract)


def form_chunk(plan: MaterializedPlan, a: torch.Tensor, g: torch.Tensor, start: int, dot: int) -> torch.Tensor:
    """G_n for the chunk of examples from `start`, by a GEMM over the tokens (`_common.bmm`, or torch.bmm where
    the plan says; fp32 accumulation, stored in the operand dtype: fp16/bf16 inputs give the rounded G the formed
    kernel contracts)."""
    count = min(plan.step, a.shape[0] - start)
    chunk = plan.grads[:count]
    g_t, a_n, g_n = g[start:start + count].transpose(1, 2), a[start:start + count], chunk[..., :a.shape[2]]
    if plan.torch_form:
        torch.bmm(g_t, a_n, out=g_n)  # 16-bit g and a of G's dtype; a strided out is cuBLAS's ldc, no copy
    else:
        _common.bmm(g_t, a_n, g_n, dot=dot)
    return chunk


def contract_chunk(plan: MaterializedPlan, chunk: torch.Tensor, out: torch.Tensor, dot: int) -> None:
    """out [Q, chunk's examples] = the contraction of the queries with a formed chunk: the kernel reading G
    (GIVEN), or torch's GEMM where the plan says."""
    if plan.torch_contract:  # [Q, O·i_pad] · [O·i_pad, examples]: the padding columns are zeros on both sides
        v_flat, g_flat = plan.vk.reshape(plan.vk.shape[0], -1), chunk.reshape(chunk.shape[0], -1)
        if chunk.device.type == "cpu":  # no fp32-output 16-bit product there: fp32 operands, the same products
            out.copy_(v_flat.float() @ g_flat.float().T)
        else:
            out.copy_(torch.mm(v_flat, g_flat.T, out_dtype=torch.float32))
        return
    _contract(plan.vk, chunk, chunk, out, 1, chunk.shape[1], plan.i_pad, plan.cfg, dot, given=True)


def _materialized_scores(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor, dot: int) -> None:
    """out = ⟨V_q, G_n⟩ with G_n = g_nᵀ a_n formed in memory, one chunk of examples at a time (`form_chunk`), then
    contracted (`contract_chunk`)."""
    plan = materialized_plan(v, a, dot)
    for start in range(0, a.shape[0], plan.step):
        chunk = form_chunk(plan, a, g, start, dot)
        contract_chunk(plan, chunk, out[:, start:start + chunk.shape[0]], dot)


def mma_formed_scores(v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor,
                      cfg: _blocks.MmaFormedConfig) -> None:
    """out [Q, N] = ⟨V_q, G_n⟩ by `_score_pairwise_mma_kernel` (16-bit v, a, g of one dtype, T ≤ cfg.block_t): v
    and a padded along i to a multiple of block_i, g as [N, O, block_t] (tokens contiguous, zero-padded); the
    contraction split over ranges of i and of output-row tiles as the main kernel's (`split_contraction`); output
    rows in chunks of cfg.o_chunk (0: all of a split's rows at once)."""
    q, o, i = v.shape
    n, t, _ = a.shape
    i_pad = _common.round_up(i, max(_common.ALIGN, cfg.block_i))
    vk = _common.aligned_rows(v, i_pad)
    ak = _common.aligned_rows(a, i_pad)
    gk = _common.padded(g.transpose(1, 2), (n, o, cfg.block_t))
    # the split's output-row ranges in whole tiles of block_o rows
    grid_n, i_per_split, i_splits, o_tiles_per_split, o_splits = contraction_grid(
        q, n, triton.cdiv(o, cfg.block_o), i_pad, cfg, a.device)

    def launch(vq, wq):
        _score_pairwise_mma_kernel[(grid_n, triton.cdiv(vq.shape[0], cfg.block_q), i_splits * o_splits)](
            vq, ak, gk, wq, vq.shape[0], n, t, o, i_pad, i_per_split, o_tiles_per_split * cfg.block_o, i_splits,
            cfg.o_chunk or o, vq.stride(0), vq.stride(1), ak.stride(0), ak.stride(1), gk.stride(0), gk.stride(1),
            wq.stride(0), wq.stride(1),
            BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, BLOCK_O=cfg.block_o, BLOCK_I=cfg.block_i, BLOCK_T=cfg.block_t,
            ASYNC_G=cfg.async_g, FLAT=cfg.flat, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    _launch_by_query_range(launch, vk, out, i_splits * o_splits, cfg.block_q)


FORMS = {
    "tokenwise": "token-wise GEMM (score_per_token's kernel, summed over tokens)",
    "formed": "G_n tiles formed on chip on the CUDA cores",
    "materialized": "G_n materialised in chunks of examples, then contracted",
    "fused": "G_n tiles formed on the tensor cores and contracted at once (PAIRWISE_MMA_FORMED_GPU_BLOCKS)",
}


def pairwise_form(q: int, n: int, t: int, dtypes: tuple[torch.dtype, ...]) -> tuple[str, int]:
    """(form, dot code) that `score_pairwise_triton` takes for these sizes and the (v, a, g) dtypes: a key of FORMS
    (also what `sf.explain` reports)."""
    dot = _common.dot_code(dtypes[1]) if len(set(dtypes)) == 1 else _common.DOT_F32
    if _blocks.pairwise_tokenwise(t, dot):
        return "tokenwise", dot
    if dot == _common.DOT_F32:
        dot = _blocks.fp32_dot("pairwise")  # IEEE, or 3xTF32 where FP32_TENSOR_CORES turns it on
    if _blocks.pairwise_materializes(t, dot):
        return ("fused" if _blocks.pairwise_mma_formed_blocks(q, n, t, dot) else "materialized"), dot
    return "formed", dot


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
    form, dot = pairwise_form(q, n, t, (v.dtype, a.dtype, g.dtype))
    if form == "tokenwise":
        if t == 1:
            return tokenwise_scores(v, a, g, out)
        per_token = tokenwise_scores(v, a, g, torch.empty(q, n * t, dtype=torch.float32, device=a.device))
        return torch.sum(per_token.view(q, n, t), dim=2, out=out)  # a fixed-shape reduction: deterministic
    if form == "fused":
        mma_formed_scores(v, a, g, out, _blocks.pairwise_mma_formed_blocks(q, n, t, dot))
    elif form == "materialized":
        _materialized_scores(v, a, g, out, dot)
    else:
        cfg = _blocks.pairwise_blocks(q, n, t, i, dot)
        vk, ak, gt, i_pad = _kernel_layout(v, a, g)
        _contract(vk, ak, gt, out, t, o, i_pad, cfg, dot, given=False)
    return out
