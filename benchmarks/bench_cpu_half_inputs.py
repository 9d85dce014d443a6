"""fp16/bf16 CPU tensors: the C++ `cpu` backend (inputs upcast to fp32, then its fp32 kernels) against the torch
backend, which served them before the ninth session, per op at the CPU benchmarks' kind of shapes.

    python benchmarks/bench_cpu_half_inputs.py [--threads 2] [--rep-s 2] [--no-write]

Prints a table (p50 ms, speedup) and writes results/cpu_half_inputs.{csv,md} with the machine, versions and date.
`--smoke` runs tiny shapes and writes nothing (the CI smoke test).
"""
from __future__ import annotations

import argparse
import csv
import io as _stringio
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from source_fast import io, ops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _cases(smoke: bool):
    """(op, shape label, make(dtype) -> thunk(backend))."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(dtype)

    def basis(n):
        return torch.linalg.qr(torch.randn(n, n, generator=gen))[0]

    def pairwise(q, n, t, o, i):
        def make(dtype):
            v, a, g = randn(q, o, i, dtype=dtype), randn(n, t, i, dtype=dtype), randn(n, t, o, dtype=dtype)
            return lambda b: ops.score_pairwise(v, a, g, backend=b)
        return ("score_pairwise", f"Q={q} N={n} T={t} O={o} I={i}", make)

    def covariance(r, d):
        def make(dtype):
            x = randn(r, d, dtype=dtype)
            return lambda b: ops.covariance(x, backend=b)
        return ("covariance", f"R={r} D={d}", make)

    def per_example(op, n, t, o, i):
        def make(dtype):
            a, g = randn(n, t, i, dtype=dtype), randn(n, t, o, dtype=dtype)
            q_a, q_s, w = basis(i), basis(o), torch.rand(o, i, generator=gen)
            if op == "lambda_accum":
                return lambda b: ops.lambda_accum(a, g, q_a, q_s, backend=b)
            return lambda b: ops.score_self(a, g, q_s, q_a, w, backend=b)
        return (op, f"N={n} T={t} O={o} I={i}", make)

    if smoke:
        return [pairwise(3, 20, 1, 9, 7), covariance(30, 9), per_example("lambda_accum", 5, 3, 9, 7),
                per_example("score_self", 5, 3, 9, 7)]
    return [pairwise(100, 4000, 1, 512, 129), pairwise(64, 1024, 4, 256, 257), pairwise(32, 512, 16, 256, 257),
            covariance(65536, 513), per_example("lambda_accum", 512, 16, 256, 257),
            per_example("score_self", 512, 16, 256, 257)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rep-s", type=float, default=2.0, help="seconds of repetitions per measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, nothing written")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = H.environment(torch.device("cpu"))
    rows = []
    for op, shape, make in _cases(args.smoke):
        for dtype in (torch.bfloat16, torch.float16):
            run = make(dtype)
            ms = {b: H.host_bench(lambda b=b: run(b), rep_s=0.05 if args.smoke else args.rep_s)[0]
                  for b in ("cpu", "torch")}
            rows.append({"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                         "cpu_ms": round(ms["cpu"], 3), "torch_ms": round(ms["torch"], 3),
                         "speedup": round(ms["torch"] / ms["cpu"], 2)})
    title = (f"fp16/bf16 CPU inputs, C++ backend (upcast) vs torch backend: {H.cpu_model()}, threads="
             f"{args.threads}, torch {env['torch']}, commit {env['git_commit']}, {env['timestamp']}")
    lines = ["| op | shape | dtype | cpu (ms, p50) | torch (ms, p50) | speedup |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['cpu_ms']} | {r['torch_ms']} | {r['speedup']}× |"
              for r in rows]
    print(title)
    print("\n".join(lines))
    if not (args.smoke or args.no_write):
        buf = _stringio.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) + ["machine", "threads", "torch", "commit", "date"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "machine": H.cpu_model(), "threads": args.threads, "torch": env["torch"],
                             "commit": env["git_commit"], "date": env["timestamp"]})
        io.atomic_write_bytes(RESULTS / "cpu_half_inputs.csv", buf.getvalue().encode())
        io.atomic_write_bytes(RESULTS / "cpu_half_inputs.md", (f"# {title}\n\n`python benchmarks/"
                                                               f"bench_cpu_half_inputs.py --threads {args.threads}`"
                                                               "\n\n" + "\n".join(lines) + "\n").encode())
        print(f"wrote {RESULTS / 'cpu_half_inputs.csv'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
