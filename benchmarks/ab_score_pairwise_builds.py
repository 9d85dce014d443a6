"""A/B of two builds of the compiled module on score_pairwise's C++ kernels, in one process, runs interleaved.

On a shared host the time of one run drifts by 10-30 % within minutes, more than a kernel change often gains, and
two benchmark runs minutes apart cannot tell them apart. Loading both builds of `source_fast._C` into one process
(under different package names) and alternating their runs makes the comparison fair.

    # the build to compare against: a copy of the module before the change
    mkdir -p /tmp/ab/base && cp source_fast/_C*.so /tmp/ab/base/_C.so
    # ... change csrc/, rebuild (SOURCE_FAST_BUILD_CUDA=0 SOURCE_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .)
    mkdir -p /tmp/ab/new && cp source_fast/_C*.so /tmp/ab/new/_C.so
    python benchmarks/ab_score_pairwise_builds.py /tmp/ab/base/_C.so /tmp/ab/new/_C.so --shape 200,1024,513,257 \\
        --tokens 2,4,16

Prints, per token count, each build's median time over --repeats alternating runs, the speed-up against the first
build and each build's error against the float64 reference. Kernel: score_pairwise_materialized_cpu (--kernel
score_pairwise_cpu for the token-wise one). `ab_builds.py` compares builds on every C++ op through the dispatch.
"""
from __future__ import annotations

import argparse

import torch
from ab_builds import alternate, load

from source_fast.reference import score_pairwise_ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="paths of _C shared objects (the first is the baseline)")
    ap.add_argument("--shape", default="200,1024,513,257", help="Q,N,I,O")
    ap.add_argument("--tokens", default="2,16", help="token counts T, comma-separated")
    ap.add_argument("--kernel", default="score_pairwise_materialized_cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    builds = {f"{k}:{p}": load(p, str(k)) for k, p in enumerate(args.builds)}
    q, n, i, o = (int(x) for x in args.shape.split(","))
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(q, o, i, generator=gen)
    for t in (int(x) for x in args.tokens.split(",")):
        a, g = torch.randn(n, t, i, generator=gen), torch.randn(n, t, o, generator=gen)
        outs = {k: torch.empty(q, n) for k in builds}

        def run(k):
            out = outs[k]
            getattr(builds[k], args.kernel)(v.data_ptr(), *v.stride(), a.data_ptr(), *a.stride(), g.data_ptr(),
                                            *g.stride(), 0, q, n, t, o, i, out.data_ptr(), *out.stride(), 0,
                                            args.threads)

        medians, _ = alternate(builds, run, args.repeats)
        want = score_pairwise_ref(v, a, g)  # float64
        base = medians[next(iter(builds))]
        cells = []
        for k, med in medians.items():
            err = ((outs[k].double() - want).abs().max() / want.abs().max()).item()
            cells.append(f"{k.split(':', 1)[1]} {med * 1e3:.1f} ms ({base / med:.2f}x, err {err:.1e})")
        print(f"Q={q} N={n} T={t} I={i} O={o}, {args.threads} threads: " + " | ".join(cells))


if __name__ == "__main__":
    main()
