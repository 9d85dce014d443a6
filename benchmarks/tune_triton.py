"""Measure candidate tiles of the Triton kernels on a GPU; keep the fastest correct one per table entry.

The GPU tile tables (source_fast/kernels/_blocks.py) were chosen from sm_90 builds without a GPU. This script
times the alternatives a lease can afford, most important first (bf16 scoring, the memory-bound covariance),
each through the op's Triton path with the candidate forced (`_blocks.override_blocks`):

    python benchmarks/tune_triton.py --out triton_blocks.json [--budget-s 150] [--only pairwise_one,...]
    python benchmarks/tune_triton.py --smoke   # CPU interpreter, tiny shapes: every candidate's correctness

A candidate counts only if its result matches the torch backend's within 2x the default tile's error, or within
a floor per dtype (ERROR_FLOOR: forms differ in where they round 16-bit operands). The output JSON holds the
machine, versions and date, every measured row (with the torch backend's time on the same inputs, so a run cut
off before the benchmarks still gives the main kernels' speedups and TFLOP/s), and "best": the entries whose
fastest candidate beat the default by ≥ 3 %. That file can be named by SOURCE_FAST_TRITON_BLOCKS
(scripts/gpu_check.sh does so for the benchmarks after it), and `python benchmarks/import_gpu_results.py
<folder>` turns it into source_fast/kernels/_tuned_blocks.py. The file is rewritten after each entry, so a run
cut off by its lease keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if "--smoke" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from source_fast import io, ops  # noqa: E402
from source_fast.kernels import _blocks, _common  # noqa: E402

IMPROVEMENT = 0.03  # a measured tile replaces the default only when it is at least this much faster
# Relative error any candidate may reach whatever the default's (forms differ in where they round 16-bit
# operands: forming G on chip rounds it once more than the token-wise GEMM); a wrong kernel is off by O(1).
ERROR_FLOOR = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}


@dataclass
class Entry:
    """One table entry to tune: `slot` picks the element of a score_pairwise pair (0: one token, 1: several)."""
    name: str
    table: str
    key: object
    slot: int | None
    candidates: list[tuple]
    shape: dict
    smoke_shape: dict
    make: Callable  # (shape, device) -> inputs
    run: Callable   # (inputs, backend) -> tensor
    flops: Callable  # shape -> flop count (for TFLOP/s in the rows)
    bytes: Callable | None = None  # shape -> bytes a memory-bound entry must move (for GB/s in the rows)

    def key_for(self, shape: dict):
        """The table key the run reads: a named key ("narrow", "pairwise", "contract", ...) as it is; dtype-keyed
        tables by the inputs' dtype (smoke runs use fp16 for the 16-bit entries: the interpreter has no bf16 dots)."""
        if isinstance(self.key, str):
            return self.key
        return _common.dot_code(getattr(torch, shape["dtype"]))

    def value(self, candidate: tuple, key):
        if self.slot is None:
            return candidate
        pair = list(getattr(_blocks, self.table)[key])
        pair[self.slot] = candidate
        return tuple(pair)


def _randn(shape, device, dtype, seed):
    """Seeded normal numbers drawn on the device itself (a CPU draw of 5·10⁸ numbers would take seconds of a
    lease)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


def _pairwise_inputs(p, device):
    dt = getattr(torch, p["dtype"])
    return (_randn((p["Q"], p["O"], p["I"]), device, dt, 0), _randn((p["N"], p["T"], p["I"]), device, dt, 1),
            _randn((p["N"], p["T"], p["O"]), device, dt, 2))


def _lowrank_inputs(p, device):
    dt = getattr(torch, p["dtype"])
    return (_randn((p["Q"], p["O"], p["R"]), device, dt, 10), _randn((p["Q"], p["I"], p["R"]), device, dt, 11),
            _randn((p["N"], p["T"], p["I"]), device, dt, 12), _randn((p["N"], p["T"], p["O"]), device, dt, 13))


def _covariance_inputs(p, device):
    return (_randn((p["R"], p["D"]), device, getattr(torch, p["dtype"]), 3),)


def _pair_inputs(p, device):
    dt = getattr(torch, p["dtype"])
    q_s = torch.linalg.qr(_randn((p["O"], p["O"]), device, torch.float32, 4))[0]
    q_a = torch.linalg.qr(_randn((p["I"], p["I"]), device, torch.float32, 5))[0]
    return (_randn((p["N"], p["T"], p["I"]), device, dt, 6), _randn((p["N"], p["T"], p["O"]), device, dt, 7), q_a, q_s)


def _gemm_inputs(p, device):
    return (_randn((p["M"], p["K"]), device, getattr(torch, p["dtype"]), 8), _randn((p["K"], p["N"]), device,
                                                                                     torch.float32, 9))


def _gemm_run(inputs, backend):
    x, q = inputs
    if backend == "torch":
        return x.float() @ q
    out = torch.empty(x.shape[0], q.shape[1], dtype=torch.float32, device=x.device)
    return _common.bmm(x.unsqueeze(0), q.unsqueeze(0), out.unsqueeze(0), dot=_common.dot_code(x.dtype))[0]


# (BLOCK_Q, BLOCK_N, BLOCK_I, most tokens formed at once, warps, stages) of score_pairwise forming G on chip for one
# token, and the same for several; (BLOCK_M, BLOCK_O, BLOCK_I, warps, stages) of the token-wise GEMM. The first of
# each list is the default; the sm_90 builds of the others were read without a GPU (spills noted: they are still
# worth timing where the spill sits outside the innermost loop).
_FORMED_ONE = [(128, 256, 32, 1, 8, 3), (128, 256, 32, 1, 8, 4), (64, 256, 32, 1, 8, 3), (128, 128, 64, 1, 8, 3),
               (128, 128, 32, 1, 8, 3), (128, 256, 64, 1, 8, 3)]  # the last spills 48 B
_TOKENWISE = [(128, 128, 64, 8, 3), (128, 64, 32, 8, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 4),
              (64, 128, 64, 4, 3), (128, 256, 64, 8, 3)]  # the last spills in its epilogue
_FEW = [(128, 64, 32, 8, 8, 3), (128, 64, 32, 4, 8, 3), (128, 128, 32, 4, 8, 3), (128, 128, 32, 2, 8, 3),
        (128, 64, 64, 2, 8, 3), (64, 128, 32, 8, 8, 3)]
_PAIRWISE_ONE = dict(dtype="bfloat16", Q=512, N=8192, T=1, O=1024, I=1025)
_PAIRWISE_SMOKE = dict(dtype="float16", Q=5, N=7, T=1, O=3, I=37)


_PAIRWISE_MANY = dict(dtype="bfloat16", Q=512, N=8192, T=16, O=1024, I=1025)
_PAIRWISE_MANY_SMOKE = dict(dtype="float16", Q=5, N=7, T=11, O=3, I=37)


def _pairwise_flops(p):
    return 2 * p["Q"] * p["N"] * p["T"] * p["O"] * p["I"]


def _pairwise_many_flops(p):
    """The materialised form's MACs × 2: the contraction (Q per G element) and the forming (T)."""
    return 2 * p["N"] * p["O"] * p["I"] * (p["Q"] + p["T"])


ENTRIES = [
    # Several tokens per example first: bf16 scoring at 16 tokens is the target furthest from its roof (72 ms, 13 %
    # of the H100's datasheet), and the fused form and cuBLAS stages below have not been timed yet.
    # More tokens than formed on chip: G_n materialised in chunks and contracted by the kernel's GEMM (TFLOP/s of the
    # contraction and the forming, 2·N·O·I·(Q + T)), or fused (PAIRWISE_MMA_FORMED_GPU_BLOCKS): G tiles formed on the
    # tensor cores and contracted at once, never in memory. The default (first) keeps the materialised form; the
    # others turn the fused form on up to 16 tokens at tiles whose sm_90 builds have no spills: one loop per chunk
    # or nested, g in the software pipeline or plain loads, 8- or 16-wide inputs, output rows in chunks of 128 (g's
    # chunk in L2 across the input blocks), 256 or all at once.
    Entry("pairwise_many_mma_formed", "PAIRWISE_MMA_FORMED_GPU_BLOCKS", 2, None,
          [(0, 128, 64, 16, 16, 128, 1, 1, 8, 2), (16, 128, 64, 16, 16, 128, 1, 1, 8, 2),
           (16, 128, 64, 16, 16, 128, 0, 1, 8, 2), (16, 128, 64, 16, 8, 128, 1, 1, 8, 3),
           (16, 128, 64, 16, 8, 128, 1, 0, 8, 3), (16, 128, 64, 16, 16, 256, 1, 1, 8, 2),
           (16, 128, 64, 16, 16, 0, 1, 1, 8, 2), (16, 128, 64, 16, 8, 128, 0, 0, 8, 3)],
          _PAIRWISE_MANY, _PAIRWISE_MANY_SMOKE, _pairwise_inputs, lambda x, b: ops.score_pairwise(*x, backend=b),
          _pairwise_many_flops),
    # ... and each of its stages by torch's GEMM (cuBLAS) on the same chunks instead of the Triton kernel, at the
    # default tiles: the contraction first (most of the MACs), then the forming.
    Entry("pairwise_many_torch_contract", "PAIRWISE_MATERIALIZED_TORCH", "contract", None, [(0,), (1,)],
          _PAIRWISE_MANY, _PAIRWISE_MANY_SMOKE, _pairwise_inputs, lambda x, b: ops.score_pairwise(*x, backend=b),
          _pairwise_many_flops),
    Entry("pairwise_many_torch_form", "PAIRWISE_MATERIALIZED_TORCH", "form", None, [(0,), (1,)],
          _PAIRWISE_MANY, _PAIRWISE_MANY_SMOKE, _pairwise_inputs, lambda x, b: ops.score_pairwise(*x, backend=b),
          _pairwise_many_flops),
    # ... and the materialised contraction's own tiles (TFLOP/s of the contraction and the forming, 2·N·O·I·(Q + T)).
    Entry("pairwise_many_bf16", "PAIRWISE_MATERIALIZED_GPU_BLOCKS", 2, None,
          [(128, 128, 64, 8, 3), (128, 256, 32, 8, 4), (64, 256, 64, 8, 3), (128, 256, 64, 8, 3)],  # last spills
          _PAIRWISE_MANY, _PAIRWISE_MANY_SMOKE, _pairwise_inputs, lambda x, b: ops.score_pairwise(*x, backend=b),
          _pairwise_many_flops),
    # One token per example: score_pairwise forms G on chip for 16-bit inputs (PAIRWISE_TOKENWISE_GPU); its tiles.
    Entry("pairwise_one_bf16", "PAIRWISE_GPU_BLOCKS", 2, 0, _FORMED_ONE, _PAIRWISE_ONE, _PAIRWISE_SMOKE,
          _pairwise_inputs, lambda x, b: ops.score_pairwise(*x, backend=b), _pairwise_flops),
    # The token-wise GEMM's tiles, through score_per_token (the same kernel and MACs as score_pairwise's token-wise
    # form for one token) ...
    Entry("per_token_bf16", "PER_TOKEN_GPU_BLOCKS", 2, None, _TOKENWISE, _PAIRWISE_ONE, _PAIRWISE_SMOKE,
          _pairwise_inputs, lambda x, b: ops.score_per_token(*x, backend=b), _pairwise_flops),
    # ... and whether score_pairwise should take it for one token instead of forming G (1: token-wise), at the
    # default tiles of both.
    Entry("pairwise_one_form_bf16", "PAIRWISE_TOKENWISE_GPU", 2, None, [(0,), (1,)], _PAIRWISE_ONE,
          _PAIRWISE_SMOKE, _pairwise_inputs, lambda x, b: ops.score_pairwise(*x, backend=b), _pairwise_flops),
    Entry("covariance_narrow_bf16", "COVARIANCE_GPU_BLOCKS", "narrow", None,
          [(64, 128, 8), (64, 256, 8), (64, 64, 4), (64, 256, 4), (64, 512, 8), (32, 256, 4)],
          dict(dtype="bfloat16", R=2**24, D=32), dict(dtype="float16", R=300, D=32), _covariance_inputs,
          lambda x, b: ops.covariance(x[0], backend=b), lambda p: p["R"] * p["D"] * (p["D"] + 1),
          lambda p: 2 * p["R"] * p["D"] + 4 * p["D"] ** 2),  # the rows read once, the fp32 result written
    Entry("pairwise_few_bf16", "PAIRWISE_GPU_BLOCKS", 2, 1, _FEW,
          dict(dtype="bfloat16", Q=256, N=4096, T=4, O=1024, I=1025),
          dict(dtype="float16", Q=5, N=7, T=3, O=3, I=37), _pairwise_inputs,
          lambda x, b: ops.score_pairwise(*x, backend=b), _pairwise_flops),
    Entry("covariance_wide_bf16", "COVARIANCE_GPU_BLOCKS", "wide", None,
          [(128, 64, 8), (64, 64, 4), (64, 32, 4), (128, 32, 8), (64, 128, 4)],
          dict(dtype="bfloat16", R=65536, D=2049), dict(dtype="float16", R=150, D=80), _covariance_inputs,
          lambda x, b: ops.covariance(x[0], backend=b), lambda p: p["R"] * p["D"] * (p["D"] + 1)),
    Entry("pair_bf16", "PAIR_GPU_BLOCKS", 2, None,
          [(128, 64, 32, 8, 128), (128, 64, 32, 8, 0), (64, 64, 32, 4, 0), (64, 128, 32, 8, 128),
           (128, 128, 32, 8, 0), (64, 64, 16, 4, 0)],
          dict(dtype="bfloat16", N=1024, T=16, O=1024, I=2049), dict(dtype="float16", N=3, T=5, O=20, I=80),
          _pair_inputs, lambda x, b: ops.lambda_accum(*x, backend=b),
          lambda p: 2 * p["N"] * p["T"] * (p["O"] ** 2 + p["I"] ** 2 + p["O"] * p["I"])),
    Entry("gemm_bf16", "GEMM_GPU_BLOCKS", 2, None,
          [(128, 128, 64, 8), (64, 64, 32, 4), (128, 64, 64, 4), (128, 128, 32, 8), (64, 128, 64, 4),
           (128, 256, 64, 8)],
          dict(dtype="bfloat16", M=65536, K=1040, N=1040), dict(dtype="float16", M=70, K=40, N=24),
          _gemm_inputs, _gemm_run, lambda p: 2 * p["M"] * p["K"] * p["N"]),
    Entry("pairwise_one_fp32", "PER_TOKEN_GPU_BLOCKS", 0, None,
          [(64, 64, 32, 4, 3), (64, 64, 16, 4, 3), (64, 32, 32, 4, 3), (128, 64, 16, 8, 3), (64, 64, 32, 4, 2)],
          dict(dtype="float32", Q=128, N=2048, T=1, O=1024, I=1025), dict(dtype="float32", Q=5, N=7, T=1, O=3, I=37),
          _pairwise_inputs, lambda x, b: ops.score_pairwise(*x, backend=b), _pairwise_flops),
    Entry("lowrank_bf16", "LOWRANK_GPU_BLOCKS", 2, None,
          [(128, 32, 128, 8, 3), (64, 64, 128, 8, 3), (128, 64, 64, 8, 3), (128, 32, 128, 8, 4),
           (128, 64, 128, 8, 3), (64, 32, 32, 4, 3)],  # the last: one query of rank 32 per program, as before
          dict(dtype="bfloat16", Q=256, N=4096, T=16, O=1024, I=1025, R=32),
          dict(dtype="float16", Q=3, N=5, T=3, O=80, I=70, R=5), _lowrank_inputs,
          lambda x, b: ops.score_lowrank(*x, backend=b),
          lambda p: 2 * p["Q"] * p["N"] * p["T"] * p["R"] * (p["O"] + p["I"])),
    Entry("gemm_fp32", "GEMM_GPU_BLOCKS", 0, None,
          [(64, 64, 32, 4), (64, 64, 16, 4), (128, 64, 16, 8), (128, 128, 16, 8), (64, 128, 32, 8)],
          dict(dtype="float32", M=16384, K=1040, N=1040), dict(dtype="float32", M=70, K=40, N=24),
          _gemm_inputs, _gemm_run, lambda p: 2 * p["M"] * p["K"] * p["N"]),
    # fp32 inputs on tensor cores as 3xTF32 (about fp32's accuracy: the error gate above still applies) against
    # IEEE fp32 dots on the CUDA cores, per kernel family: the GEMM (kron_project, rotations) and the token-wise
    # GEMM (fp32 one-token score_pairwise).
    Entry("gemm_fp32_tensor_cores", "FP32_TENSOR_CORES", "gemm", None, [(0,), (1,)],
          dict(dtype="float32", M=16384, K=1040, N=1040), dict(dtype="float32", M=70, K=40, N=24),
          _gemm_inputs, _gemm_run, lambda p: 2 * p["M"] * p["K"] * p["N"]),
    Entry("pairwise_many_fp32_tensor_cores", "FP32_TENSOR_CORES", "pairwise", None, [(0,), (1,)],
          dict(dtype="float32", Q=128, N=2048, T=16, O=1024, I=1025), dict(dtype="float32", Q=5, N=7, T=9, O=3, I=37),
          _pairwise_inputs, lambda x, b: ops.score_pairwise(*x, backend=b),
          _pairwise_many_flops),
    Entry("pairwise_one_fp32_tensor_cores", "FP32_TENSOR_CORES", "per_token", None, [(0,), (1,)],
          dict(dtype="float32", Q=128, N=2048, T=1, O=1024, I=1025), dict(dtype="float32", Q=5, N=7, T=1, O=3, I=37),
          _pairwise_inputs, lambda x, b: ops.score_pairwise(*x, backend=b), _pairwise_flops),
]


def _gbps(entry: Entry, shape: dict, ms: float) -> dict:
    """{"gbps": ...} for a memory-bound entry timed in ms (nothing otherwise)."""
    if entry.bytes is None or ms != ms:
        return {}
    return {"gbps": entry.bytes(shape) / ms / 1e6}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300))


def _time_ms(fn, device: torch.device, smoke: bool) -> float:
    """Median ms by the op benchmarks' timer (do_bench, or a few CUDA-event calls for slow ones)."""
    if smoke or device.type != "cuda":
        return float("nan")  # the interpreter is never timed
    return H.cuda_bench(fn)[0]


def tune(entries, device, smoke: bool, budget_s: float, out: Path | None, log=print) -> dict:
    env = H.environment(device)
    result = {"device": env["device_name"], "capability": "", "versions": {k: env[k] for k in ("torch", "triton",
              "cuda", "git_commit")}, "date": env["timestamp"], "rows": [], "best": {}}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        result["capability"] = f"sm_{major}{minor}"
    started = time.monotonic()
    failures = 0
    for entry in entries:
        if time.monotonic() - started > budget_s:
            log(f"SKIP {entry.name}: budget of {budget_s:.0f} s spent")
            continue
        shape = entry.smoke_shape if smoke else entry.shape
        try:
            inputs = entry.make(shape, device)
            want = entry.run(inputs, "torch")
            torch_ms = _time_ms(lambda: entry.run(inputs, "torch"), device, smoke)  # the baseline, in the same run
        except Exception as e:  # e.g. out of memory: the other entries still run
            result["rows"].append({"entry": entry.name, "table": entry.table, "candidate": "torch backend",
                                   "shape": shape, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            failures += 1
            log(f"  {entry.name}: ERROR preparing the entry: {type(e).__name__}: {str(e)[:300]}")
            inputs = want = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        result["rows"].append({"entry": entry.name, "table": entry.table, "candidate": "torch backend", "shape": shape,
                               "ok": True, "ms": torch_ms,
                               "tflops": entry.flops(shape) / torch_ms / 1e9 if torch_ms == torch_ms else None,
                               **_gbps(entry, shape, torch_ms)})
        log(f"  {entry.name} torch backend: {torch_ms:.3f} ms"
            + (f" ({result['rows'][-1]['tflops']:.1f} TFLOP/s)" if result["rows"][-1].get("tflops") else ""))
        default = entry.candidates[0]
        default_err, default_ms, best = None, None, (None, float("inf"))
        for cand in entry.candidates:
            if time.monotonic() - started > budget_s and cand != default:
                log(f"  budget spent: {entry.name} stops before {cand}")
                break
            key = entry.key_for(shape)
            _blocks.override_blocks({entry.table: {str(key): entry.value(cand, key)}})
            row = {"entry": entry.name, "table": entry.table, "key": str(key), "slot": entry.slot,
                   "candidate": list(cand), "shape": shape}
            try:
                got = entry.run(inputs, "triton")  # compiles
                err = _rel_err(got, want)
                if default_err is None:
                    default_err = err
                ok = err <= max(2 * default_err, ERROR_FLOOR[shape["dtype"]])
                ms = _time_ms(lambda: entry.run(inputs, "triton"), device, smoke) if ok else float("nan")
                row.update(rel_err=err, ok=ok, ms=ms, tflops=entry.flops(shape) / ms / 1e9 if ms == ms else None,
                           **_gbps(entry, shape, ms))
                if cand == default:
                    default_ms = ms
                if ok and ms < best[1]:
                    best = (cand, ms)
                failures += 0 if ok else 1
                log(f"  {entry.name} {cand}: err {err:.2e} {'ok' if ok else 'WRONG'} "
                    f"{ms:.3f} ms" + (f" ({row['tflops']:.1f} TFLOP/s)" if row.get("tflops") else "")
                    + (f" ({row['gbps']:.0f} GB/s)" if row.get("gbps") else ""))
            except Exception as e:  # a tile the compiler rejects (shared memory, registers) is a result too
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                failures += 1
                log(f"  {entry.name} {cand}: ERROR {row['error']}")
            finally:
                _blocks.override_blocks(None)
            result["rows"].append(row)
        cand, ms = best
        if cand is not None and cand != default and default_ms and ms <= (1 - IMPROVEMENT) * default_ms:
            key = entry.key_for(shape)
            table = result["best"].setdefault(entry.table, {})
            base = table.get(str(key), getattr(_blocks, entry.table)[key])
            if entry.slot is None:
                table[str(key)] = list(cand)
            else:
                pair = [list(v) for v in base]
                pair[entry.slot] = list(cand)
                table[str(key)] = pair
            log(f"BEST {entry.name}: {cand} {ms:.3f} ms vs default {default_ms:.3f} ms")
        if out is not None:
            io.atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
        inputs = want = got = None  # the next entry's inputs are allocated without these alongside
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["failures"] = failures
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (rewritten after each entry)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting candidates after this")
    parser.add_argument("--only", default="", help="comma-separated entry names (default: all, in priority order)")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, correctness only")
    args = parser.parse_args(argv)
    names = [e.name for e in ENTRIES]
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"--only: unknown entries {unknown}; expected some of {names}")
    entries = [e for e in ENTRIES if not only or e.name in only]
    device = torch.device("cpu") if args.smoke else H.pick_device("cuda")
    result = tune(entries, device, args.smoke, args.budget_s if not args.smoke else float("inf"),
                  None if args.smoke else args.out)
    print(f"{'SMOKE ' if args.smoke else ''}tuned {len(entries)} entries, {len(result['rows'])} candidates, "
          f"{result['failures']} failed; best: {json.dumps(result['best'])}")
    return 1 if args.smoke and result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
