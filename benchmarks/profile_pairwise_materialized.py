"""Where the time of materialised score_pairwise goes: forming G_n against contracting it, per chunk.

Triton score_pairwise materialises G_n = g_nᵀ a_n when an example has more tokens than a tile forms on chip
(`kernels/score_pairwise.py`). The H100 run of 2026-11-26 measured the whole op (bf16, Q = 512, N = 8192, T = 16,
O × I = 1024 × 1025) at 72 ms, about 3× an estimate from a memory-bound forming pass plus an L2-bound GEMM. This
script times the two stages of one chunk apart (CUDA events through the op benchmarks' timer), next to the whole
op and the torch backend, and prints the chunk size, the contraction's split (programs and waves on this GPU),
the forming pass's GB/s and the contraction's TFLOP/s:

    python benchmarks/profile_pairwise_materialized.py --device cuda [--q 512 --n 8192 --t 16 --o 1024 --i 1025]
    python benchmarks/profile_pairwise_materialized.py --smoke     # CPU interpreter, tiny shapes: runs, no timing

It writes nothing: `scripts/gpu_check.sh` keeps its output in bench.log (a lent machine returns at most 8
files).
"""
from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

import _harness as H  # noqa: E402
from source_fast import ops, reference  # noqa: E402
from source_fast.kernels import _blocks, _common  # noqa: E402
from source_fast.kernels import score_pairwise as kernel  # noqa: E402


def _time(fn, device: torch.device) -> float:
    if device.type != "cuda":
        fn()
        return float("nan")  # the interpreter is never timed
    return H.cuda_bench(fn)[0]


def profile(q: int, n: int, t: int, o: int, i: int, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    v = torch.randn(q, o, i, generator=gen, device=device).to(dtype)
    a = torch.randn(n, t, i, generator=gen, device=device).to(dtype)
    g = torch.randn(n, t, o, generator=gen, device=device).to(dtype)
    dot = _common.dot_code(dtype)
    if dot == _common.DOT_F32:
        dot = _blocks.fp32_dot("pairwise")
    if not _blocks.pairwise_materializes(t, dot):
        raise SystemExit(f"T={t} is formed on chip for {dtype} (at most "
                         f"{_blocks.gpu_blocks('PAIRWISE_GPU_BLOCKS', dot)[1][3]} tokens): pick more tokens")
    got = ops.score_pairwise(v, a, g, backend="triton")
    sample = slice(0, min(n, 64))
    err = float((got[:, sample].double() - reference.score_pairwise_ref(v, a[sample], g[sample])).norm()
                / reference.score_pairwise_ref(v, a[sample], g[sample]).norm())

    # One chunk, as _materialized_scores runs it.
    plan = kernel.materialized_plan(v, a, dot)
    cfg, step, i_pad = plan.cfg, plan.step, plan.i_pad
    chunk = kernel.form_chunk(plan, a, g, 0, dot)
    out = torch.empty(q, chunk.shape[0], dtype=torch.float32, device=device)

    def form():
        kernel.form_chunk(plan, a, g, 0, dot)

    def contract():
        kernel.contract_chunk(plan, chunk, out, dot)

    grid = triton.cdiv(step, cfg.block_n) * triton.cdiv(q, cfg.block_q)
    i_per, i_splits, o_per, o_splits = kernel.split_contraction(grid, i_pad, o, cfg.block_i, q * step, device)
    sms = _common.num_sms(device)
    programs = grid * i_splits * o_splits
    row = dict(q=q, n=n, t=t, o=o, i=i, dtype=str(dtype).replace("torch.", ""), chunk=step, chunks=-(-n // step),
               tile=f"{cfg.block_n} examples x {cfg.block_q} queries x {cfg.block_i} inputs, "
                    f"{cfg.num_warps} warps, {cfg.num_stages} stages",
               split=f"{i_splits} input x {o_splits} output-row splits", programs=programs,
               waves=round(programs / sms, 2), rel_err=err)
    row["form_ms"] = _time(form, device)
    row["contract_ms"] = _time(contract, device)
    row["op_ms"] = _time(lambda: ops.score_pairwise(v, a, g, backend="triton"), device)
    row["torch_ms"] = _time(lambda: ops.score_pairwise(v, a, g, backend="torch"), device)
    if device.type == "cuda":
        row["form_gbps"] = chunk.numel() * chunk.element_size() / row["form_ms"] / 1e6  # G written
        row["contract_tflops"] = 2 * q * step * o * i / row["contract_ms"] / 1e9
        row["op_tflops"] = 2 * q * n * o * i / row["op_ms"] / 1e9
        row["chunks_ms"] = row["chunks"] * (row["form_ms"] + row["contract_ms"])  # vs op_ms: the rest is overhead
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    for name, default in (("q", 512), ("n", 8192), ("t", 16), ("o", 1024), ("i", 1025)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: runs the stages, no timing")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke else args.device)
    dtype = getattr(torch, "float16" if args.smoke and args.dtype == "bfloat16" else args.dtype)
    shape = (5, 9, 11, 7, 37) if args.smoke else (args.q, args.n, args.t, args.o, args.i)
    env = H.environment(device)
    print(f"# profile_pairwise_materialized on {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['git_commit']}, {env['timestamp']}")
    row = profile(*shape, dtype, device)
    for key, value in row.items():
        print(f"  {key:>16}: {value:.4g}" if isinstance(value, float) else f"  {key:>16}: {value}")
    ok = row["rel_err"] < (1e-4 if dtype == torch.float32 else 3e-2)
    print(f"PROFILE pairwise_materialized: rel_err {row['rel_err']:.2e} ({'ok' if ok else 'WRONG'})"
          + (f"; form {row['form_ms']:.3g} ms ({row['form_gbps']:.0f} GB/s), contract {row['contract_ms']:.3g} ms "
             f"({row['contract_tflops']:.0f} TFLOP/s) per chunk of {row['chunk']}; op {row['op_ms']:.3g} ms "
             f"({row['op_tflops']:.0f} TFLOP/s), torch {row['torch_ms']:.3g} ms" if device.type == "cuda" else ""))
    if args.smoke:
        print("SMOKE: no timing")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
