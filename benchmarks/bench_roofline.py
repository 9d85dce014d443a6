"""Measured ceilings of a CUDA device: copy bandwidth and matrix-product rates (the roofline the op tables
are read against).

Datasheet rates are leads; these are what the card gives here, through torch:

  copy        device-to-device copy of 2 GiB, counting bytes read + written (GB/s)
  mm_fp32     8192³ float32 product with TF32 off (the CUDA-core rate; fp32 kernels' ceiling)
  mm_tf32     the same with TF32 on (tensor cores on fp32 operands)
  mm_bf16     8192³ bfloat16 product (dense tensor-core rate)

Each: median of ``triton.testing.do_bench`` (random data, never zeros). Writes
``benchmarks/results/roofline_<device>.json`` (or --out) with device, versions and date.

    python benchmarks/bench_roofline.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import _harness as H
from source_fast import io


def _median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))


def _copy_gbps(device: torch.device, gen: torch.Generator) -> float:
    src = torch.rand(2**29, device=device, generator=gen)  # 2 GiB fp32
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _matmul_tflops(device: torch.device, gen: torch.Generator, dtype: torch.dtype, tf32: bool, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        ms = _median_ms(lambda: a @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure(device: torch.device) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(0)
    out = {"copy_gbps": _copy_gbps(device, gen)}
    for name, dtype, tf32 in (("mm_fp32", torch.float32, False), ("mm_tf32", torch.float32, True),
                              ("mm_bf16", torch.bfloat16, False)):
        out[f"{name}_tflops"] = _matmul_tflops(device, gen, dtype, tf32)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/roofline_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("bench_roofline: needs a CUDA device (the CPU tables carry no roofline)", file=sys.stderr)
        return 2
    record = {**H.environment(device), **measure(device)}
    for k, v in record.items():
        print(f"{k:>16}: {v:.1f}" if isinstance(v, float) else f"{k:>16}: {v}")
    out = Path(args.out) if args.out else H.RESULTS_DIR / f"roofline_{H.device_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
