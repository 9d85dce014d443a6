"""A/B of two or more builds of the compiled module on every C++ op, in one process, runs interleaved.

On a shared host the time of one run drifts by 10-30 % within minutes, more than a kernel change often gains, so
two benchmark runs minutes apart cannot tell builds apart. Here each build of `source_fast._C` is loaded under its
own name and put in place of `source_fast._C` in turn (the torch-side layer looks the module up at every call),
alternating per run, and each case's median over --repeats runs is compared. Cases go through the public ops
with backend="cpu", so they take the dispatch's kernel choice (e.g. the sparse-g kernel where g has zeros).

    mkdir -p /tmp/ab/base && cp source_fast/_C*.so /tmp/ab/base/_C.so     # before the change
    # ... change csrc/, rebuild (SOURCE_FAST_BUILD_CUDA=0 SOURCE_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .)
    mkdir -p /tmp/ab/new && cp source_fast/_C*.so /tmp/ab/new/_C.so
    python benchmarks/ab_builds.py /tmp/ab/base/_C.so /tmp/ab/new/_C.so [--cases gemm,score_pairwise] [--threads 2]

Prints one line per case: each build's median, its speed-up against the first build, and the largest difference
of its result from the first build's, relative to that result's largest magnitude.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch

import source_fast as sf
from source_fast import _extension


def load(path: str, tag: str):
    """The compiled module at `path`, imported under its own name (several builds side by side)."""
    spec = importlib.util.spec_from_file_location(f"ab_build_{tag}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alternate(keys, run, repeats: int) -> tuple[dict, dict]:
    """(median seconds, warm-up result) per key of run(key): one warm-up call each, then `repeats` timed rounds
    over the keys, every other round in reverse order (so neither build always runs first)."""
    keys = list(keys)
    results = {key: run(key) for key in keys}
    times = {key: [] for key in keys}
    for rep in range(repeats):
        for key in (keys if rep % 2 == 0 else keys[::-1]):
            start = time.perf_counter()
            run(key)
            times[key].append(time.perf_counter() - start)
    return {key: sorted(ts)[repeats // 2] for key, ts in times.items()}, results


def _cases(selected: set[str]):
    """Yield (group, label, thunk) per case; each thunk returns the op's result. Inputs are made per group, when
    it is reached (with every group's inputs allocated at once, the batched GEMMs ran several times slower
    here: 0.95 s instead of 0.12 s)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    def orthogonal(n):
        return torch.linalg.qr(rand(n, n))[0].contiguous()

    if "gemm" in selected:
        x, b = rand(4096, 785), rand(785, 785)
        v, right, left = rand(32, 512, 785), rand(785, 785), rand(512, 512)
        yield "gemm", "rows 4096x785 @ 785x785", lambda: _extension.gemm_cpu(x, b)
        yield "gemm", "right [32,512,785] @ 785x785", lambda: _extension.gemm_cpu(v, right)
        yield "gemm", "left 512x512 @ [32,512,785]", lambda: _extension.gemm_cpu(left, v)
        del x, b, v, right, left
    if "covariance" in selected:
        for r, d in ((8192, 785), (16384, 257)):
            x = rand(r, d)
            yield "covariance", f"R={r} D={d}", lambda x=x: sf.ops.covariance(x, backend="cpu")
    if "lambda_accum" in selected:
        for n, t in ((512, 1), (128, 16)):
            a, g, q_a, q_s = rand(n, t, 513), rand(n, t, 257), orthogonal(513), orthogonal(257)
            yield ("lambda_accum", f"N={n} T={t} I=513 O=257",
                   lambda a=a, g=g, q_a=q_a, q_s=q_s: sf.ops.lambda_accum(a, g, q_a, q_s, backend="cpu"))
    if "score_self" in selected:
        for n, t in ((512, 1), (128, 16)):
            a, g, q_a, q_s, w = rand(n, t, 513), rand(n, t, 257), orthogonal(513), orthogonal(257), rand(257, 513).abs()
            yield ("score_self", f"N={n} T={t} I=513 O=257",
                   lambda a=a, g=g, q_a=q_a, q_s=q_s, w=w: sf.ops.score_self(a, g, q_s, q_a, w, backend="cpu"))
    if "score_pairwise" in selected:
        q, n, i, o = 200, 1024, 785, 512
        v = _extension.queries_innermost_empty(q, o, i, dtype=torch.float32, device=torch.device("cpu"))
        v.copy_(rand(q, o, i))
        for t, sparse in ((1, False), (16, False), (1, True), (2, True)):
            a, g = rand(n, t, i), rand(n, t, o)
            if sparse:  # ReLU-like: about half of g exactly zero, shared by the tokens (a segment's checkpoints)
                g = g * (torch.rand(n, 1, o, generator=gen) < 0.5)
            label = f"Q={q} N={n} T={t} I={i} O={o}" + (" sparse g" if sparse else "")
            yield "score_pairwise", label, lambda a=a, g=g: sf.ops.score_pairwise(v, a, g, backend="cpu")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="paths of _C shared objects (the first is the baseline)")
    ap.add_argument("--cases", default="gemm,covariance,lambda_accum,score_self,score_pairwise")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    builds = {f"{k}:{path}": load(path, str(k)) for k, path in enumerate(args.builds)}  # a path may repeat
    original = sys.modules.get("source_fast._C")
    print(f"{args.threads} threads, median of {args.repeats} alternating runs; speed-up against {args.builds[0]}")
    try:
        for group, label, thunk in _cases(set(args.cases.split(","))):
            def run(key, thunk=thunk):  # the warm-up call also runs the dispatch's self-test of a first use
                sys.modules["source_fast._C"] = builds[key]
                return thunk()

            medians, results = alternate(builds, run, args.repeats)
            base_key = next(iter(builds))
            base, ref = medians[base_key], results[base_key].double()
            cells = []
            for key, med in medians.items():
                diff = ((results[key].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                cells.append(f"{med * 1e3:8.2f} ms ({base / med:.2f}x, diff {diff:.0e})")
            print(f"{group:14s} {label:34s} " + " | ".join(cells), flush=True)
    finally:
        if original is not None:
            sys.modules["source_fast._C"] = original


if __name__ == "__main__":
    main()
