"""Where the time of materialised score_pairwise goes: forming G_n against contracting it, per chunk.

Triton score_pairwise materialises G_n = g_nᵀ a_n when an example has more tokens than a tile forms on chip
(`kernels/score_pairwise.py`). The H100 run of 2026-11-26 measured the whole op (bf16, Q = 512, N = 8192, T = 16,
O × I = 1024 × 1025) at 72 ms, about 3× an estimate from a memory-bound forming pass plus an L2-bound GEMM. This
script times the two stages of one chunk apart (CUDA events through the op benchmarks' timer), next to the whole
op and the torch backend, and prints the chunk size, the contraction's split (programs and waves on this GPU),
the forming pass's GB/s and the contraction's TFLOP/s; then the same for both stages by torch's GEMMs (cuBLAS) on
the same kind of chunk (`_blocks.PAIRWISE_MATERIALIZED_TORCH`), which shows whether the kernels or the form itself
are slow; and the materialised form fused (`_blocks.PAIRWISE_MMA_FORMED_GPU_BLOCKS` forced on at the device's
tile, 16-bit inputs of up to 16 tokens): G tiles formed on the tensor cores and contracted at once, G never in
memory:

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
    want = reference.score_pairwise_ref(v, a[sample], g[sample])

    def rel_err(scores: torch.Tensor) -> float:  # on the first (up to) 64 examples
        return float((scores[:, sample].double() - want).norm() / want.norm())

    err = rel_err(got)

    def stages(by_torch: int) -> dict:
        """One chunk as _materialized_scores runs it, both stages by the Triton kernels (0) or by torch's GEMMs
        (1: PAIRWISE_MATERIALIZED_TORCH): chunk size, times and rates (rates compare across chunk sizes)."""
        _blocks.override_blocks({"PAIRWISE_MATERIALIZED_TORCH": {"form": [by_torch], "contract": [by_torch]}})
        try:
            plan = kernel.materialized_plan(v, a, dot)
            if by_torch and not (plan.torch_form and plan.torch_contract):
                return {}  # torch cannot keep the precision here (fp32 G, or no fp32-output 16-bit products)
            chunk = kernel.form_chunk(plan, a, g, 0, dot)
            out = torch.empty(q, chunk.shape[0], dtype=torch.float32, device=device)
            kernel.contract_chunk(plan, chunk, out, dot)
            chunk_err = rel_err(out)
            form_ms = _time(lambda: kernel.form_chunk(plan, a, g, 0, dot), device)
            contract_ms = _time(lambda: kernel.contract_chunk(plan, chunk, out, dot), device)
            row = {"chunk": plan.step, "chunks": -(-n // plan.step), "rel_err": chunk_err, "form_ms": form_ms,
                   "contract_ms": contract_ms}
            if device.type == "cuda":
                row["form_gbps"] = chunk.numel() * chunk.element_size() / form_ms / 1e6  # G written
                row["contract_tflops"] = 2 * q * plan.step * o * i / contract_ms / 1e9
                row["chunks_ms"] = row["chunks"] * (form_ms + contract_ms)  # vs op_ms: the rest is overhead
            if not by_torch:
                cfg = plan.cfg
                grid_n, _, i_splits, _, o_splits = kernel.contraction_grid(q, plan.step, o, plan.i_pad, cfg, device)
                programs = grid_n * triton.cdiv(q, cfg.block_q) * i_splits * o_splits
                row.update(tile=f"{cfg.block_n} examples x {cfg.block_q} queries x {cfg.block_i} inputs, "
                                f"{cfg.num_warps} warps, {cfg.num_stages} stages",
                           split=f"{i_splits} input x {o_splits} output-row splits", programs=programs,
                           waves=round(programs / _common.num_sms(device), 2))
            return row
        finally:
            _blocks.override_blocks(None)
            plan = chunk = out = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def fused() -> dict:
        """The whole op by the fused form, forced on at the device's tile; {} where it cannot take these inputs."""
        if dot not in (_common.DOT_F16, _common.DOT_BF16) or t > _blocks.MMA_FORMED_MAX_T:
            return {}
        entry = list(_blocks.gpu_blocks("PAIRWISE_MMA_FORMED_GPU_BLOCKS", dot))
        _blocks.override_blocks({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {str(dot): [t, *entry[1:]]}})
        try:
            row = {"rel_err": rel_err(ops.score_pairwise(v, a, g, backend="triton")),
                   "ms": _time(lambda: ops.score_pairwise(v, a, g, backend="triton"), device),
                   "tile": "{} queries x {} examples x {} output rows x {} inputs, rows in chunks of {}, async g {}, "
                           "one loop {}, {} warps, {} stages".format(*entry[1:])}
            if device.type == "cuda":
                row["tflops"] = 2 * q * n * o * i / row["ms"] / 1e9
            return row
        finally:
            _blocks.override_blocks(None)

    row = dict(q=q, n=n, t=t, o=o, i=i, dtype=str(dtype).replace("torch.", ""), rel_err=err)
    row.update({k: val for k, val in stages(0).items() if k != "rel_err"})  # the chunk's error: the op's above
    row.update({f"torch_{k}": val for k, val in stages(1).items() if k not in ("chunks", "chunks_ms")})
    row.update({f"fused_{k}": val for k, val in fused().items()})
    row["op_ms"] = _time(lambda: ops.score_pairwise(v, a, g, backend="triton"), device)
    row["torch_backend_ms"] = _time(lambda: ops.score_pairwise(v, a, g, backend="torch"), device)
    if device.type == "cuda":
        row["op_tflops"] = 2 * q * n * o * i / row["op_ms"] / 1e9
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
    bound = 1e-4 if dtype == torch.float32 else 3e-2
    ok = row["rel_err"] < bound and row.get("torch_rel_err", 0.0) < bound and row.get("fused_rel_err", 0.0) < bound
    print(f"PROFILE pairwise_materialized: rel_err {row['rel_err']:.2e}"
          + (f", by cuBLAS {row['torch_rel_err']:.2e}" if "torch_rel_err" in row else "")
          + (f", fused {row['fused_rel_err']:.2e}" if "fused_rel_err" in row else "")
          + f" ({'ok' if ok else 'WRONG'})"
          + (f"; form {row['form_ms']:.3g} ms ({row['form_gbps']:.0f} GB/s), contract {row['contract_ms']:.3g} ms "
             f"({row['contract_tflops']:.0f} TFLOP/s) per chunk of {row['chunk']}; op {row['op_ms']:.3g} ms "
             f"({row['op_tflops']:.0f} TFLOP/s), torch backend {row['torch_backend_ms']:.3g} ms"
             + (f"; by cuBLAS: form {row['torch_form_ms']:.3g} ms ({row['torch_form_gbps']:.0f} GB/s), contract "
                f"{row['torch_contract_ms']:.3g} ms ({row['torch_contract_tflops']:.0f} TFLOP/s) per chunk of "
                f"{row['torch_chunk']}" if "torch_form_ms" in row else "; cuBLAS stages: not run (precision)")
             + (f"; fused {row['fused_ms']:.3g} ms ({row['fused_tflops']:.0f} TFLOP/s)" if "fused_ms" in row else "")
             if device.type == "cuda" else ""))
    if args.smoke:
        print("SMOKE: no timing")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
