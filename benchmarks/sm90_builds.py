"""What the Triton kernels' GPU builds look like, without a GPU: one row per kernel form at its default tiles.

Every Triton kernel is compiled for sm_90 (H100/H200) on this machine (source_fast/kernels/_aot.py: Triton's
compiler and the cuobjdump its wheel bundles need no GPU), at the tiles `kernels/_blocks.py` picks for a
representative large shape, with the divisibility facts the launchers guarantee. The table shows what decides
speed before any timing:

  reg / spill   registers per thread (under the launcher's maxnreg cap where it sets one) and bytes of stack
                (spills; "(k in the inner loop)": local loads and stores inside the innermost loop, paid every
                step, against once per outer step elsewhere);
  CTAs/SM       programs one SM can hold by registers and by shared memory (the smaller);
  wgmma         the HGMMA shapes; "regs A" when the left operand comes from registers;
  async         asynchronous copies (LDGSTS), i.e. loads the software pipeliner overlaps with the dots;
  loops         loops in the build (Triton pipelines only the innermost one);
  B/MAC         bytes the tile streams per multiply-add (16-bit operands: 2/M + 2/N for an M × N output tile;
                see each row's note), against the ≈ 0.015-0.02 an H100 SM can be fed from L2 at full
                tensor-core rate (≈ 2048 bf16 multiply-adds per clock per SM).

    python benchmarks/sm90_builds.py            # prints the table, writes results/sm90_builds.{md,json}
    python benchmarks/sm90_builds.py --arch 80  # the A100's builds at its tiles: results/sm80_builds.*
    python benchmarks/sm90_builds.py --no-write

A GPU run then says how far each build is from its roof (benchmarks/tune_triton.py, bench_roofline.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the GPU tiles, not the interpreter's

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from source_fast import io  # noqa: E402
from source_fast.kernels import _aot, _blocks, _common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARCH = 90  # the target (--arch); the tiles follow it through _blocks.device_arch
SM_REGISTERS, SM_THREADS = 65536, 2048  # per SM, both architectures
SM_SHARED = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use (A100, H100)

PTR = {0: "*fp32", 1: "*fp16", 2: "*bf16", 3: "*fp32", 4: "*fp32"}  # 3: TF32, 4: 3xTF32
DTYPE = {0: "fp32", 1: "fp16", 2: "bf16"}


def _opts(warps: int, stages: int | None, div16: list[str]) -> dict:
    opts = {"num_warps": warps, "div16": div16}
    if stages is not None:
        opts["num_stages"] = stages
    return opts


def _element(dot: int) -> int:
    """Bytes per streamed operand element of a dot dtype code (fp32 for IEEE, TF32 and 3xTF32)."""
    return _common.storage_dtype(dot).itemsize


def _pairwise_case(dot: int, cfg, block_t: int, given: bool) -> tuple:
    """The build case of `_score_pairwise_kernel` at a configuration, with the launcher's alignment facts."""
    strides = {f"s_{k}": "i64" for k in ("vq", "vo", "an", "at", "go", "gt", "os", "oq")}
    sig = dict(v_ptr=PTR[dot], a_ptr=PTR[dot], gt_ptr=PTR[dot], out_ptr="*fp32", Q="i32", N="i32", T="i32",
               O="i32", I="i32", i_per_split="i32", o_per_split="i32", i_splits="i32", **strides)
    const = dict(BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, BLOCK_I=cfg.block_i, BLOCK_T=block_t, GIVEN=given,
                 DOT=dot)
    return ("source_fast.kernels.score_pairwise", "_score_pairwise_kernel", sig, const, ARCH,
            _opts(cfg.num_warps, cfg.num_stages, ["v_ptr", "a_ptr", "gt_ptr", "out_ptr", "s_vq", "s_vo", "s_an",
                                                  "s_at", "s_go", "s_gt", "I", "i_per_split"]))


def pairwise_formed(dot: int, t: int) -> tuple:
    """score_pairwise forming G on chip (16-bit default for any T), Q=512, N=8192, O=1024, I=1025."""
    cfg = _blocks.pairwise_blocks(512, 8192, t, 1040, dot)
    tile = f"{cfg.block_n} examples × {cfg.block_q} queries × {cfg.block_i} inputs, {cfg.block_t} token(s)"
    return (_pairwise_case(dot, cfg, cfg.block_t, False), tile, _element(dot) / cfg.block_n,
            "only V streams: 2/BLOCK_N (4/BLOCK_N fp32)")


def pairwise_materialized(dot: int) -> tuple:
    """score_pairwise contracting materialised G_n (more tokens than formed on chip), Q=512, O=1024, I=1025."""
    cfg = _blocks.pairwise_materialized_blocks(512, 8192, 1040, dot)
    tile = f"{cfg.block_n} examples × {cfg.block_q} queries × {cfg.block_i} inputs (G read)"
    return (_pairwise_case(dot, cfg, 1, True), tile, _element(dot) / cfg.block_n + _element(dot) / cfg.block_q,
            "2/BLOCK_N + 2/BLOCK_Q (+ forming G: one more pass)")


def pairwise_mma_formed(dot: int) -> tuple:
    """score_pairwise's materialised form fused (PAIRWISE_MMA_FORMED_GPU_BLOCKS, off until timed): G tiles formed by
    the tensor cores over up to 16 tokens, Q=512, O=1024, I=1025."""
    _, bq, bn, bo, bi, o_chunk, async_g, flat, warps, stages = _blocks.gpu_blocks("PAIRWISE_MMA_FORMED_GPU_BLOCKS",
                                                                                  dot)
    strides = {f"s_{k}": "i64" for k in ("vq", "vo", "an", "at", "gn", "go", "os", "oq")}
    sig = dict(v_ptr=PTR[dot], a_ptr=PTR[dot], g_ptr=PTR[dot], out_ptr="*fp32", Q="i32", N="i32", T="i32",
               O="i32", I="i32", i_per_split="i32", o_per_split="i32", i_splits="i32", o_chunk="i32", **strides)
    const = dict(BLOCK_Q=bq, BLOCK_N=bn, BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=_blocks.MMA_FORMED_MAX_T,
                 ASYNC_G=bool(async_g), FLAT=bool(flat))
    case = ("source_fast.kernels.score_pairwise", "_score_pairwise_mma_kernel", sig, const, ARCH,
            _opts(warps, stages, ["v_ptr", "a_ptr", "g_ptr", "out_ptr", "s_vq", "s_vo", "s_an", "s_at", "s_gn",
                                  "s_go", "s_os", "I", "i_per_split"]))
    t = _blocks.MMA_FORMED_MAX_T
    return (case, f"{bn} examples × {bq} queries × ({bo} outputs × {bi} inputs), {t} tokens, rows in chunks of "
            f"{o_chunk or 'all'}" + (", g pipelined" if async_g else "") + (", one loop" if flat else ", nested"),
            _element(dot) / bn + _element(dot) * t / (bq * bi) + (_element(dot) * t / (bq * bo) if flat else 0),
            "2/BLOCK_N (V) + 2·16/(BLOCK_Q·BLOCK_I) (g, from L2 within a chunk of rows)"
            + (" + 2·16/(BLOCK_Q·BLOCK_O) (a, every step)" if flat else "") + "; G never in memory")


def tokenwise(dot: int) -> tuple:
    """The token-wise GEMM (score_per_token; score_pairwise's fp32 one-token form), N·T = 8192 rows."""
    bm, bo, bi, warps, stages = _blocks.per_token_blocks(8192, 1024, 1040, dot)
    sig = dict(v_ptr=PTR[dot], a_ptr=PTR[dot], g_ptr=PTR[dot], out_ptr="*fp32", O="i32", I="i32", ROWS="i64",
               row_start="i64", q_start="i64", s_vq="i64", s_vo="i32", s_ar="i64", s_gr="i64", s_oq="i64")
    const = dict(BLOCK_M=bm, BLOCK_O=bo, BLOCK_I=bi, DOT=dot, ROWS_FASTEST=True, s_vi=1, s_ai=1, s_go=1)
    case = ("source_fast.kernels.score_per_token", "_score_per_token_kernel", sig, const, ARCH,
            _opts(warps, stages, ["v_ptr", "a_ptr", "g_ptr", "s_vq", "s_vo", "s_ar", "s_gr", "O", "I"]))
    return (case, f"{bm} rows × {bo} outputs × {bi} inputs", _element(dot) / bm + _element(dot) / bo,
            "2/M + 2/N (4/M + 4/N fp32)")


def covariance(dot: int, d: int) -> tuple:
    """covariance of R rows × D (narrow: memory-bound, one tile)."""
    block_d, block_r, warps = _blocks.covariance_blocks(2 ** 24, d, _element(dot))
    sig = dict(x_ptr=PTR[dot], y_ptr=PTR[dot], m_ptr="*fp32", out_ptr="*fp32", pairs_ptr="*i32", R="i64", D="i32",
               rows_per_split="i64", stride_xr="i32", stride_os="i32", stride_or="i32")
    const = dict(BLOCK_D=block_d, BLOCK_R=block_r, CHUNK_R=block_r * _common.PROMOTE_STEPS, DOT=dot,
                 HAS_MASK=False, ACCUMULATE=False, SELECT_FLUSH=d <= block_d,
                 SHARE_ROWS=d <= block_d and ARCH >= 90)
    case = ("source_fast.kernels.covariance", "_covariance_kernel", sig, const, ARCH,
            _opts(warps, None, ["x_ptr", "y_ptr", "m_ptr", "out_ptr", "D", "rows_per_split", "stride_xr",
                                "stride_os", "stride_or"]))
    note = "memory-bound: bytes per row, not per MAC" if d <= block_d else "2/M + 2/N"
    return case, f"{block_d} × {block_d} tile, {block_r} rows per step", (None if d <= block_d else 4 / block_d), note


def lambda_accum(dot: int) -> tuple:
    """lambda_accum's fused per-example kernel, T = 16, O = 1024, I = 2049."""
    bo, bi, bt, launch = _blocks.pair_blocks(1024, 2064, 16, dot)
    sig = dict(gs_ptr=PTR[dot], as_ptr=PTR[dot], out_ptr="*fp32", N="i32", T="i32", O="i32", I="i32",
               n_per_split="i32", stride_os="i32", stride_oo="i32")
    const = dict(BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=bt, DOT=dot, ACCUMULATE=True, ONE_CHUNK=True)
    case = ("source_fast.kernels.lambda_accum", "_lambda_accum_kernel", sig, const, ARCH,
            {**launch, "div16": ["gs_ptr", "as_ptr", "out_ptr", "O", "I", "stride_oo"]})
    return case, f"{bo} × {bi} outputs, {bt} tokens", 2 / bo + 2 / bi, "per example: 2/BLOCK_O + 2/BLOCK_I"


def score_self(dot: int) -> tuple:
    bo, bi, bt, launch = _blocks.pair_blocks(1024, 2064, 16, dot, cap_registers=False)
    sig = dict(gs_ptr=PTR[dot], as_ptr=PTR[dot], w_ptr="*fp32", ws_ptr="*fp32", N="i32", T="i32", O="i32",
               I="i32", n_per_split="i32", stride_wst="i32")
    const = dict(BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=bt, DOT=dot, ONE_CHUNK=True)
    case = ("source_fast.kernels.score_self", "_score_self_kernel", sig, const, ARCH,
            {**launch, "div16": ["gs_ptr", "as_ptr", "w_ptr", "ws_ptr", "O", "I"]})
    return case, f"{bo} × {bi} outputs, {bt} tokens", 2 / bo + 2 / bi, "per example: 2/BLOCK_O + 2/BLOCK_I (W kept)"


def lowrank(dot: int) -> tuple:
    """score_lowrank streamed, Q = 256, T = 16, O = I = 1024, R = 32."""
    cfg = _blocks.lowrank_blocks(256, 4096, 16, 1024, 1040, 32, dot)
    sig = dict(u_ptr=PTR[dot], w_ptr=PTR[dot], a_ptr=PTR[dot], g_ptr=PTR[dot], out_ptr="*fp32", Q="i32", N="i32",
               T="i32", O="i32", I="i32", R="i32", n_start="i64", s_uq="i64", s_uo="i32", s_wq="i64", s_wi="i32",
               s_an="i64", s_at="i64", s_gn="i64", s_gt="i64", s_oq="i64")
    const = dict(BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o,
                 BLOCK_I=cfg.block_i, BLOCK_R=cfg.block_r, RESIDENT=cfg.resident, DOT=dot, s_ur=1, s_wr=1, s_ai=1,
                 s_go=1, s_on=1)
    case = ("source_fast.kernels.score_lowrank", "_score_lowrank_kernel", sig, const, ARCH,
            _opts(cfg.num_warps, cfg.num_stages, ["u_ptr", "w_ptr", "a_ptr", "g_ptr", "s_uq", "s_uo", "s_wq",
                                                  "s_wi", "s_an", "s_at", "s_gn", "s_gt", "O", "I", "R"]))
    rows, cols = cfg.block_n * cfg.block_t, cfg.block_q * cfg.block_r
    return case, f"{rows} rows × {cfg.block_q} queries × {cfg.block_r} ranks", 2 / rows + 2 / cols, "2/M + 2/N"


def gemm(dot: int) -> tuple:
    """`_common.bmm` (token rotations, kron_project), M = 65536, K = N = 1040, operands in the dot dtype (fp32 for
    TF32)."""
    bm, bn, bk, warps = _blocks.gemm_blocks(65536, 1040, 1040, dot)
    sig = dict(a_ptr=PTR[dot], b_ptr=PTR[dot], c_ptr="*fp32", f_ptr="*fp32", M="i32", N="i32", K="i64",
               stride_ab="i64", stride_am="i32", stride_bb="i32", stride_bk="i32", stride_cb="i64", stride_cm="i32",
               stride_fk="i32", stride_fn="i32", spec_c="fp32", spec_damping="fp32")
    const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT=dot, FKIND=0, SQUARE=False, ACCUMULATE=False,
                 stride_ak=1, stride_bn=1, stride_cn=1)
    case = ("source_fast.kernels._common", "_bmm_kernel", sig, const, ARCH,
            _opts(warps, None, ["a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_ab", "stride_am", "stride_bk",
                                "stride_cb", "stride_cm"]))
    return (case, f"{bm} × {bn} × {bk}", _element(dot) / bm + _element(dot) / bn,
            "2/M + 2/N (4/M + 4/N for fp32 operands)")


ROWS = [
    ("score_pairwise, 1 token (formed G)", lambda: pairwise_formed(2, 1)),
    ("score_pairwise, 4 tokens (formed G)", lambda: pairwise_formed(2, 4)),
    ("score_pairwise, 16 tokens (materialised G)", lambda: pairwise_materialized(2)),
    ("score_pairwise, 16 tokens (fused: G formed on tensor cores)", lambda: pairwise_mma_formed(2)),
    ("token-wise GEMM (score_per_token)", lambda: tokenwise(2)),
    ("score_lowrank, R = 32", lambda: lowrank(2)),
    ("lambda_accum, T = 16", lambda: lambda_accum(2)),
    ("score_self, T = 16", lambda: score_self(2)),
    ("GEMM (bmm)", lambda: gemm(2)),
    ("GEMM, TF32 (lambda_accum's 1-token squares)", lambda: gemm(_common.DOT_TF32)),
    ("covariance, D = 32 (narrow)", lambda: covariance(2, 32)),
    ("covariance, D = 2049 (wide)", lambda: covariance(2, 2064)),
    ("token-wise GEMM, fp32", lambda: tokenwise(0)),
    ("token-wise GEMM, fp32 as 3xTF32 (FP32_TENSOR_CORES)", lambda: tokenwise(_common.DOT_F32X3)),
    ("GEMM, fp32 as 3xTF32 (FP32_TENSOR_CORES)", lambda: gemm(_common.DOT_F32X3)),
    ("score_pairwise, 4 tokens, fp32 as 3xTF32 (FP32_TENSOR_CORES)", lambda: pairwise_formed(_common.DOT_F32X3, 4)),
    ("score_pairwise, 16 tokens (materialised), fp32 as 3xTF32", lambda: pairwise_materialized(_common.DOT_F32X3)),
    ("covariance, D = 32 (narrow), fp32", lambda: covariance(0, 32)),
    ("covariance, D = 2049 (wide), fp32", lambda: covariance(0, 2064)),
]


def ctas_per_sm(report: dict, warps: int) -> int:
    threads = 32 * warps
    by_regs = SM_REGISTERS // max(1, report["reg"] * threads)
    by_shared = SM_SHARED[ARCH] // max(1, report["shared"]) if report.get("shared") else by_regs
    return int(min(by_regs, by_shared, SM_THREADS // threads))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--arch", type=int, default=90, choices=(80, 90),
                        help="target: 90 (H100/H200, the default) or 80 (A100; its ARCH_BLOCKS tiles)")
    parser.add_argument("--measured", action="store_true",
                        help="the tiles measured on that architecture (kernels/_tuned_blocks.py) over the defaults; "
                             "written to results/sm<arch>_measured_builds.*")
    args = parser.parse_args(argv)
    global ARCH
    ARCH = args.arch
    _blocks.device_arch = lambda: f"sm_{ARCH}"  # the tiles the launchers would pick on that GPU
    if not args.measured:  # the defaults (and ARCH_BLOCKS), not what a tuning run measured with its triton
        from source_fast.kernels import _tuned_blocks

        _tuned_blocks.TUNED = {}
    built = [(name, *make()) for name, make in ROWS]
    reports = _aot.compile_for_gpu([case for _, case, *_ in built], timeout=1800)
    env = H.environment(torch.device("cpu"))
    header = ("| kernel (bf16 unless noted) | tile | warps | reg | spill B | CTAs/SM | wgmma | async copies | loops "
              "| B/MAC | note |")
    lines = [header, "|" + "---|" * 11]
    rows = []
    for (name, case, tile, bpm, note), rep in zip(built, reports):
        warps = case[5]["num_warps"]
        if rep is None:
            lines.append(f"| {name} | {tile} | {warps} | (no cuobjdump in this triton wheel) |||||||")
            continue
        wg = ", ".join(rep["wgmma"]) + (" (regs A)" if rep["HGMMA"] and rep["HGMMA_REG_A"] == rep["HGMMA"] else "")
        wg = wg or ("mma.sync" if rep["HMMA"] else "")
        row = dict(kernel=name, tile=tile, warps=warps, **{k: rep[k] for k in ("reg", "stack", "LDGSTS", "LOOPS",
                                                                                  "HGMMA", "HGMMA_REG_A", "shared",
                                                                                  "SPILL_IN_LOOP")},
                   wgmma=rep["wgmma"], ctas_per_sm=ctas_per_sm(rep, warps), bytes_per_mac=bpm, note=note)
        rows.append(row)
        spill = f"{rep['stack']} ({rep['SPILL_IN_LOOP']} in the inner loop)" if rep["stack"] else "0"
        lines.append(f"| {name} | {tile} | {warps} | {rep['reg']} | {spill} | {row['ctas_per_sm']} | "
                     f"{wg or '—'} | {rep['LDGSTS']} | {rep['LOOPS']} | "
                     f"{'—' if bpm is None else f'{bpm:.4f}'} | {note} |")
    which = "the tiles measured on a GPU" if args.measured else "their default tiles"
    title = (f"sm_{ARCH} builds of the Triton kernels at {which} (no GPU): triton {env['triton']}, "
             f"torch {env['torch']}, commit {env['git_commit']}, {env['timestamp']}")
    print(title)
    print("\n".join(lines))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        stem = f"sm{ARCH}_measured_builds" if args.measured else f"sm{ARCH}_builds"
        command = "python benchmarks/sm90_builds.py" + (f" --arch {ARCH}" if ARCH != 90 else "") + (
            " --measured" if args.measured else "")
        text = f"# {title}\n\n`{command}` (see its docstring for the columns).\n\n" + "\n".join(lines) + "\n"
        io.atomic_write_bytes(RESULTS / f"{stem}.md", text.encode())
        io.atomic_write_json(RESULTS / f"{stem}.json", {"environment": env, "arch": f"sm_{ARCH}", "rows": rows,
                                                      "measured": args.measured})
        print(f"wrote {RESULTS / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
