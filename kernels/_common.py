"""Shared pieces of the Triton kernels: block sizes, dtype codes, the spectral epilogue and one
generic batched GEMM (`bmm`) used for the token rotations of lambda_accum and score_self and for
all four stages of kron_project.

Rules every kernel in this folder follows (STYLE.md §6.4-6.6):
- accumulation is fp32 (`tl.float32`) for fp16/bf16/fp32 inputs; float64 is not supported here
  (dispatch routes it to the torch backend);
- fp32 `tl.dot` runs with ``input_precision="ieee"`` (never TF32) on values of fp32 inputs: fp32 results
  must match the float64 oracle to ~1e-6 (DOT_TF32 exists only for fp32 values derived from 16-bit inputs).
  The one alternative is 3xTF32 (DOT_F32X3: three TF32 tensor-core products of hi/lo splits, about fp32's
  accuracy), opt-in per kernel family through `_blocks.FP32_TENSOR_CORES` until a GPU run shows it faster;
- every load and store is masked (the interpreter does not check bounds) and row offsets are
  int64 (rows × stride can pass 2^31);
- no float atomics and no autotuning: each output element is produced by one program in a fixed
  order, so results are bitwise reproducible on the same device/software (any split reduction
  goes through a workspace summed in a fixed order).

Block sizes, warps and pipeline depths: kernels/_blocks.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blocks import fp32_dot, gemm_blocks, interpreting

# ---------------------------------------------------------------------------------------------
# Device limits and reduction order
# ---------------------------------------------------------------------------------------------

MAX_GRID_YZ = 65535  # CUDA limit of grid axes 1 and 2


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# Tensor-core steps summed in one accumulator before it is added to the running total (covariance's row
# reduction): bounds the chain along which the MMA accumulator's truncation compounds.
PROMOTE_STEPS = 4


# ---------------------------------------------------------------------------------------------
# Aligned layouts: what lets Triton vectorise and pipeline loads
# ---------------------------------------------------------------------------------------------

# Triton specialises integer arguments divisible by 16 (and 16-byte aligned pointers). Only rows whose
# length and strides it can prove to be such multiples get vectorised loads, and only vectorised loads
# become the asynchronous copies its software pipeliner overlaps with the dots: the sm_90 build of a
# tile loop over 1025-wide rows (a layer's inputs plus the bias column) has neither.
ALIGN = 16


def shares_dot_operands(device: torch.device) -> bool:
    """Whether one loaded tile may feed both operands of a dot (covariance's xᵀx) and still be pipelined. On
    sm_80 (mma.sync) such a load gets no asynchronous copy: the sm_80 build of the narrow covariance had none,
    and with two loads of the same rows it has them. True off CUDA (the interpreter) and on sm_90+."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 9


def round_up(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


def padded(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """x zero-padded at the end of each dimension to `shape` (each ≥ x's), with a unit last stride, every
    other stride a multiple of ALIGN and a 16-byte aligned start: x itself when it already is such a tensor,
    else a copy. Zeros in the padding make it add nothing to the kernels' contractions."""
    shape = tuple(int(k) for k in shape)
    if len(shape) != x.dim() or any(k < d for k, d in zip(shape, x.shape)):
        raise ValueError(f"padded: shape must have {x.dim()} sizes each >= {tuple(x.shape)}, got {shape}")
    if (shape == tuple(x.shape) and (x.stride(-1) == 1 or x.shape[-1] <= 1) and x.data_ptr() % 16 == 0
            and all(s % ALIGN == 0 for s, k in zip(x.stride()[:-1], x.shape[:-1]) if k > 1)):
        return x
    out = x.new_zeros(shape)
    out[tuple(slice(0, d) for d in x.shape)].copy_(x)
    return out


def aligned_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """`padded` along the last dimension only: x [..., D] as [..., size]."""
    return padded(x, (*x.shape[:-1], size))


WORKSPACE_BYTES = 64 << 20  # fp32 partial sums of one split reduction


def splits_allowed(device: torch.device) -> bool:
    """Whether launchers may split a reduction over programs: on CUDA devices, never in the interpreter (whose
    programs run one after another)."""
    return device.type == "cuda" and not interpreting()


def split_count(work_items: int, tiles: int, device: torch.device, *, min_per_split: int = 4,
                max_splits: int = 64, split_bytes: int | None = None) -> int:
    """How many fixed-order partial sums to split a long reduction (over rows or examples) into
    when the output alone has too few tiles to fill the GPU. Always 1 in the interpreter. The
    partials go to a workspace summed in a fixed order, so the split keeps results deterministic
    (it depends only on shapes and the device's SM count, never on timing).

    split_bytes: the size of one partial sum. Given, the cap rises from max_splits to two splits per SM
    while the workspace stays within WORKSPACE_BYTES (a small output, e.g. a 32 x 32 covariance of 2^24
    rows, would otherwise leave half of a 132-SM GPU idle)."""
    if not splits_allowed(device):
        return 1
    if split_bytes is not None:
        max_splits = max(max_splits, min(2 * num_sms(device), WORKSPACE_BYTES // max(split_bytes, 1)))
    want = triton.cdiv(2 * num_sms(device), max(tiles, 1))
    return int(max(1, min(want, max_splits, work_items // max(min_per_split, 1))))


# ---------------------------------------------------------------------------------------------
# Dtype codes for tl.dot operands
# ---------------------------------------------------------------------------------------------

DOT_F32 = 0  # IEEE fp32 (no TF32)
DOT_F16 = 1
DOT_BF16 = 2
# fp32 operands on TF32 tensor cores: only for values derived from 16-bit inputs, whose precision TF32 (11
# significant bits) does not lose (lambda_accum's one-token GEMM of squares, which overflow fp16). Never for fp32
# inputs.
DOT_TF32 = 3
# fp32 operands as 3xTF32 on tensor cores (tl.dot input_precision="tf32x3": x = hi + lo in TF32, the product
# hi·hi + hi·lo + lo·hi): relative error about 2^-21 per product against fp32's 2^-24 rounding, fp32 accumulation.
# For fp32 inputs where `_blocks.FP32_TENSOR_CORES` turns it on (`_blocks.fp32_dot`).
DOT_F32X3 = 4


def dot_code(dtype: torch.dtype) -> int:
    """Operand dtype of tl.dot for inputs stored as `dtype`: fp16/bf16 stay in their dtype (tensor
    cores, fp32 accumulation), anything else computes in IEEE fp32."""
    if dtype == torch.float16:
        return DOT_F16
    if dtype == torch.bfloat16:
        return DOT_BF16
    if dtype == torch.float32:
        return DOT_F32
    raise TypeError(f"the triton backend supports float16, bfloat16 and float32 inputs, got {dtype}")


def storage_dtype(code: int) -> torch.dtype:
    return {DOT_F32: torch.float32, DOT_F16: torch.float16, DOT_BF16: torch.bfloat16, DOT_TF32: torch.float32,
            DOT_F32X3: torch.float32}[code]


@triton.jit
def to_dot(x, DOT: tl.constexpr):
    """Cast a tile to the tl.dot operand dtype selected by DOT."""
    if DOT == 1:
        y = x.to(tl.float16)
    elif DOT == 2:
        y = x.to(tl.bfloat16)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation; fp32 operands in IEEE precision, TF32 (DOT_TF32) or 3xTF32 (DOT_F32X3)
    only when asked."""
    if DOT == 0:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT == 3:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    elif DOT == 4:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        out = tl.dot(to_dot(a, DOT), to_dot(b, DOT), acc)
    return out


@triton.jit
def pair_tile(pid, O, I, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """The (O-tile, I-tile) of program `pid` in row-major tile order: (offs_o, offs_i, o_ok, i_ok)."""
    tiles_i = tl.cdiv(I, BLOCK_I)
    offs_o = (pid // tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = (pid % tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    return offs_o, offs_i, offs_o < O, offs_i < I


@triton.jit
def _token_rows_product(g_ptr, a_ptr, rows, t_ok, O, I, offs_o, o_ok, offs_i, i_ok, tile, DOT: tl.constexpr):
    """tile + g[rows, offs_o]ᵀ a[rows, offs_i] for the token rows `rows` (int64) where t_ok."""
    g = tl.load(g_ptr + rows[:, None] * O + offs_o[None, :], mask=t_ok[:, None] & o_ok[None, :], other=0.0)
    a = tl.load(a_ptr + rows[:, None] * I + offs_i[None, :], mask=t_ok[:, None] & i_ok[None, :], other=0.0)
    return mma(tl.trans(g), a, tile, DOT)


@triton.jit
def example_grad_tile(g_ptr, a_ptr, row0, T, O, I, offs_o, o_ok, offs_i, i_ok,
                      BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, DOT: tl.constexpr,
                      ONE_CHUNK: tl.constexpr):
    """One example's gradient tile G[offs_o, offs_i] = Σ_t g[row0 + t, offs_o] a[row0 + t, offs_i] in
    fp32 registers (g [N·T, O], a [N·T, I] contiguous; row0 int64); tokens in BLOCK_T steps, masked.
    ONE_CHUNK (T ≤ BLOCK_T): no token loop, so the caller's loop is the innermost one, which Triton
    pipelines (a token loop of one step would be the one pipelined: no load of the next example or
    tile would be in flight during this one's dot)."""
    offs_t = tl.arange(0, BLOCK_T)
    tile = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    if ONE_CHUNK:
        tile = _token_rows_product(g_ptr, a_ptr, row0 + offs_t.to(tl.int64), offs_t < T, O, I, offs_o, o_ok, offs_i,
                                   i_ok, tile, DOT)
    else:
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + offs_t
            tile = _token_rows_product(g_ptr, a_ptr, row0 + tt.to(tl.int64), tt < T, O, I, offs_o, o_ok, offs_i,
                                       i_ok, tile, DOT)
    return tile


# ---------------------------------------------------------------------------------------------
# Spectral functions f(σ) (source_fast/spectral.py) evaluated on chip
# ---------------------------------------------------------------------------------------------

F_NONE = 0      # no scaling (also `identity`)
F_TABLE = 1     # multiply by a precomputed f(Λ) table (host-evaluated: discrete_s, discrete_r)
F_INVERSE = 2   # 1 / (σ + δ)
F_EXP = 3       # exp(−c (σ + δ))
F_SOURCE_R = 4  # −expm1(−c (σ + δ)) / (σ + δ), limit c at σ + δ = 0


def spectral_code(spec) -> int:
    """Kernel code of a `spectral.Spectral`; F_TABLE means: evaluate on the host with
    `spectral.evaluate` and pass the table."""
    return {
        "identity": F_NONE,
        "inverse": F_INVERSE,
        "exp": F_EXP,
        "source_r": F_SOURCE_R,
        "discrete_s": F_TABLE,
        "discrete_r": F_TABLE,
    }[spec.kind]


@triton.jit
def spectral_eval(sigma, c, damping, FKIND: tl.constexpr):
    """f(σ + δ) elementwise in fp32 for FKIND in {F_INVERSE, F_EXP, F_SOURCE_R}; σ clamped at 0 first.

    source_r: with x = c·(σ+δ), r = (1 − e^{−x})/(σ+δ). For x < 0.5 the Taylor series
    c·Σ_{k≤10} (−x)^k/(k+1)! (Horner form, truncation < x^11/12! ≈ 1e-12) replaces the
    subtraction 1 − e^{−x}, which would cancel (there is no expm1 without libdevice); for x ≥ 0.5
    1 − e^{−x} ≥ 0.39 and the fp32 subtraction loses at most ~2 ulp. Limit c at σ+δ = 0, 0 at c = 0.
    """
    sd = tl.maximum(sigma.to(tl.float32), 0.0) + damping
    if FKIND == 2:
        f = 1.0 / sd
    elif FKIND == 3:
        f = tl.exp(-(c * sd))
    else:
        x = c * sd
        xs = tl.minimum(x, 0.5)  # the series branch only; keeps the unused lanes finite
        p = 1.0 - xs / 11.0
        p = 1.0 - (xs / 10.0) * p
        p = 1.0 - (xs / 9.0) * p
        p = 1.0 - (xs / 8.0) * p
        p = 1.0 - (xs / 7.0) * p
        p = 1.0 - (xs / 6.0) * p
        p = 1.0 - (xs / 5.0) * p
        p = 1.0 - (xs / 4.0) * p
        p = 1.0 - (xs / 3.0) * p
        p = 1.0 - (xs / 2.0) * p
        small = x < 0.5
        safe = tl.where(small, 1.0, sd)
        f = tl.where(small, c * p, (1.0 - tl.exp(-x)) / safe)
    return f


# ---------------------------------------------------------------------------------------------
# Generic batched GEMM: C[b] (+)= A[b] @ (F ⊙ B[b]), optional squaring epilogue
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bmm_kernel(a_ptr, b_ptr, c_ptr, f_ptr, M, N, K,
                stride_ab, stride_am, stride_ak,
                stride_bb, stride_bk, stride_bn,
                stride_cb, stride_cm, stride_cn,
                stride_fk, stride_fn,
                spec_c, spec_damping,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT: tl.constexpr, FKIND: tl.constexpr, SQUARE: tl.constexpr, ACCUMULATE: tl.constexpr):
    """C[b, m, n] (+)= (Σ_k A[b, m, k] · F[k, n] · B[b, k, n])^(2 if SQUARE) in fp32.

    F is 1 (FKIND = F_NONE), a table read from f_ptr (F_TABLE) or f(Λ) evaluated from Λ at f_ptr
    (a B-operand prologue: kron_project's spectral scaling costs no extra pass over memory).
    Strides are arbitrary (transposes are views; a batch stride of 0 broadcasts an operand).
    Grid: (m-tiles × n-tiles, batch).
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_m = offs_m.to(tl.int64)
    cols_n = offs_n.to(tl.int64)
    a_base = a_ptr + pid_b * stride_ab
    b_base = b_ptr + pid_b * stride_bb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k64 = kk.to(tl.int64)
        a_mask = (offs_m[:, None] < M) & (kk[None, :] < K)
        b_mask = (kk[:, None] < K) & (offs_n[None, :] < N)
        a = tl.load(a_base + rows_m[:, None] * stride_am + k64[None, :] * stride_ak, mask=a_mask, other=0.0)
        b = tl.load(b_base + k64[:, None] * stride_bk + cols_n[None, :] * stride_bn, mask=b_mask, other=0.0)
        if FKIND != 0:
            f_in = tl.load(f_ptr + k64[:, None] * stride_fk + cols_n[None, :] * stride_fn, mask=b_mask, other=0.0)
            if FKIND == 1:
                scale = f_in.to(tl.float32)
            else:
                scale = spectral_eval(f_in, spec_c, spec_damping, FKIND)
            b = b.to(tl.float32) * scale
        acc = mma(a, b, acc, DOT)
    if SQUARE:
        acc = acc * acc
    c_ptrs = c_ptr + pid_b * stride_cb + rows_m[:, None] * stride_cm + cols_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _batched_strides(t: torch.Tensor, batch: int) -> tuple[int, int, int]:
    """(batch, row, col) strides of a [1 or batch, rows, cols] view; a size-1 batch broadcasts."""
    sb = 0 if t.shape[0] == 1 and batch != 1 else t.stride(0)
    return sb, t.stride(1), t.stride(2)


def bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, dot: int = DOT_F32, fkind: int = F_NONE,
        f: torch.Tensor | None = None, spec_c: float = 0.0, spec_damping: float = 0.0, square: bool = False,
        accumulate: bool = False) -> torch.Tensor:
    """out[b] (+)= (a[b] @ (F ⊙ b[b]))^(2 if square), fp32 accumulation, for 3-D views
    a [B|1, M, K], b [B|1, K, N], out [B, M, N] (any strides; F is [K, N], see `_bmm_kernel`)."""
    batch, m, n = out.shape
    k = a.shape[2]
    if a.shape[1] != m or b.shape[1] != k or b.shape[2] != n:
        raise ValueError(f"bmm: incompatible shapes a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    if k == 0:
        if not accumulate:
            out.zero_()
        return out
    if dot == DOT_F32:
        dot = fp32_dot("gemm")
    if dot in (DOT_F16, DOT_BF16):
        # fp32 operands of a 16-bit dot are rounded here, as the kernel would round each tile (round to nearest
        # even both ways: the same bits), so that both stream as 16-bit rows. In the sm_90 build an fp32 operand
        # took 4-byte asynchronous copies (8 times as many as the 16-byte ones) and a conversion through shared
        # memory per step. A scaled b (fkind) is scaled in fp32 first, in the kernel. (The callers' fp32 operands of
        # 16-bit dots are eigenvector matrices, small next to the GEMM: the rounding pass costs little.)
        half = storage_dtype(dot)
        a = a.to(half) if a.dtype == torch.float32 else a
        b = b.to(half) if b.dtype == torch.float32 and fkind == F_NONE else b
    bm, bn, bk, warps = gemm_blocks(m, n, k, dot)
    f_arg = f if f is not None else out
    sfk, sfn = (f.stride(0), f.stride(1)) if f is not None else (0, 0)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    for b0 in range(0, batch, MAX_GRID_YZ):
        b1 = min(batch, b0 + MAX_GRID_YZ)
        a_v = a if a.shape[0] == 1 else a[b0:b1]
        b_v = b if b.shape[0] == 1 else b[b0:b1]
        c_v = out[b0:b1]
        sab, sam, sak = _batched_strides(a_v, b1 - b0)
        sbb, sbk, sbn = _batched_strides(b_v, b1 - b0)
        _bmm_kernel[(tiles, b1 - b0)](
            a_v, b_v, c_v, f_arg, m, n, k,
            sab, sam, sak, sbb, sbk, sbn,
            c_v.stride(0), c_v.stride(1), c_v.stride(2), sfk, sfn,
            float(spec_c), float(spec_damping),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT=dot, FKIND=fkind, SQUARE=square, ACCUMULATE=accumulate,
            num_warps=warps,
        )
    return out


def chunk_examples(n: int, per_example_bytes: int) -> int:
    """Examples per chunk so that one chunk's temporaries stay within SOURCE_FAST_CHUNK_MIB."""
    from source_fast import _config

    return max(1, min(max(n, 1), _config.chunk_bytes() // max(1, per_example_bytes)))
