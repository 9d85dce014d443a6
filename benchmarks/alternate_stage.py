"""One stage of bench_vs_kronfluence.py, Kronfluence and source_fast alternating in fresh processes, N pairs.

On a shared 2-core host one run per stage (what bench_vs_kronfluence.py does) can catch either library in a slow
phase; alternating pairs and reporting the medians shows how far a ratio is from the noise. The stage's factors
are fitted once per library first (not timed).

    python benchmarks/alternate_stage.py --workload reg --stage pairwise --pairs 6
    python benchmarks/alternate_stage.py --smoke     # CI: tiny sizes, one pair
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import bench_vs_kronfluence as B


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="reg", choices=["cls", "reg", "cnn"])
    parser.add_argument("--method", default="influence", choices=["influence", "source"],
                        help="source_fast's method (Kronfluence always runs EK-FAC influence)")
    parser.add_argument("--stage", default="pairwise", choices=["pairwise", "self"])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one pair (CI)")
    args = parser.parse_args(argv)
    if not B._kronfluence_available():
        print("kronfluence is not installed (requirements-kronfluence.txt): nothing to alternate with")
        return 2
    pairs = 1 if args.smoke else args.pairs
    with tempfile.TemporaryDirectory(prefix="alternate_stage_") as tmp:
        work = Path(tmp)
        data = work / f"{args.workload}.pt"
        B.prepare_workload(args.workload, B.SMOKE if args.smoke else B.FULL, data)

        def run(library, stage):
            spec = {"workload": args.workload, "library": library, "stage": stage, "threads": args.threads,
                    "method": "influence" if library == "kronfluence" else args.method,
                    "batch_size": args.batch_size, "data": str(data), "sf_backend": None, "device": "cpu",
                    "out_dir": str(work / f"{args.workload}_{library}")}
            return B._run_stage(spec, 1800)["seconds"]

        run("kronfluence", "fit")
        run("source_fast", "fit")
        kf, sf = [], []
        for i in range(pairs):
            kf.append(run("kronfluence", args.stage))
            sf.append(run("source_fast", args.stage))
            print(f"pair {i + 1}: Kronfluence influence {kf[-1]:.3f} s, source_fast {args.method} {sf[-1]:.3f} s, "
                  f"ratio {kf[-1] / sf[-1]:.2f}", flush=True)
    ratios = [a / b for a, b in zip(kf, sf)]
    line = (f"{args.workload} {args.stage}, {pairs} alternating pairs: medians Kronfluence {statistics.median(kf):.3f} s,"
            f" source_fast {statistics.median(sf):.3f} s, ratio {statistics.median(kf) / statistics.median(sf):.2f} "
            f"(per pair {min(ratios):.2f}-{max(ratios):.2f})")
    print(line + ("; SMOKE" if args.smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
