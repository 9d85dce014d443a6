"""Command line: `source-fast demo | diagnostics | lds` (also `python -m source_fast ...`).

- ``demo``: train a digits MLP briefly and attribute test predictions with SOURCE.
- ``diagnostics``: the same digits setup, then a curvature report per layer and segment (eigenvalue
  spectra and the share of TracIn-like / influence-like directions, `source_fast.diagnostics`).
- ``lds``: the counterfactual (LDS) reproduction in ``benchmarks/lds_reproduction.py``; ``--quick`` by
  default (a smoke run of every task and method in under a minute), ``--full`` for the committed one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_diagnostics(args) -> None:
    import time

    import torch
    from torch.utils.data import TensorDataset

    from . import io
    from .analyzer import SourceAnalyzer
    from .demo import DigitsTask, load_digits_data, make_model, train
    from .diagnostics import curvature_report, format_report, plot_report
    from .run import TrainingRun

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    (x_tr, y_tr, _, flipped), _ = load_digits_data(flip_fraction=0.15, seed=args.seed)
    model = make_model()
    print(f"[1/2] training the demo's 64-64-10 MLP on {len(x_tr)} digits ({int(flipped.sum())} labels flipped), "
          f"{args.epochs} epochs of SGD (lr {args.lr}, momentum 0.9), 6 checkpoints")
    paths, steps, lrs = train(model, x_tr, y_tr, epochs=args.epochs, batch_size=32, lr=args.lr, momentum=0.9,
                              num_checkpoints=6, out_dir=out, seed=args.seed)
    run = TrainingRun(paths, steps, lr=lrs, momentum=0.9, num_segments=args.num_segments)
    print("[2/2] fitting SOURCE's EK-FAC curvature per segment")
    print("      " + run.describe().replace("\n", "\n      "))
    analyzer = SourceAnalyzer(model, DigitsTask(), run, batch_size=256, progress=not args.no_progress)
    analyzer.fit(TensorDataset(x_tr, y_tr))
    rows = curvature_report(analyzer, low=args.low, high=args.high)
    print(format_report(rows))
    figure = plot_report(rows, out / "curvature.png",
                         title=f"digits MLP, {args.epochs} epochs, lr {args.lr}: SOURCE curvature regimes")
    io.atomic_write_json(out / "curvature.json", [{k: v for k, v in r.items() if k != "spectrum"} for r in rows])
    print(f"figure written to {figure}; table in {out / 'curvature.json'} ({time.perf_counter() - t0:.1f} s)")


def _load_lds_script():
    """benchmarks/lds_reproduction.py lives next to the package in a source checkout (editable install)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "lds_reproduction.py"
    if not script.exists():
        raise SystemExit(f"source-fast lds: {script} not found; this command needs a source checkout of source_fast "
                         "(pip install -e .), since the benchmark scripts are not part of the wheel")
    name = "lds_reproduction"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # worker processes unpickle its functions by module name
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="source-fast", description="SOURCE training data attribution")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a digits MLP briefly and attribute test predictions with SOURCE")
    demo.add_argument("--output-dir", default="demo_output", help="where checkpoints, factors and the figure go")
    demo.add_argument("--num-queries", type=int, default=6, help="test digits to attribute")
    demo.add_argument("--top-k", type=int, default=3, help="proponents/opponents shown per query")
    demo.add_argument("--epochs", type=int, default=4, help="training epochs (brief on purpose)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-plot", action="store_true", help="skip the PNG figure")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    diag = sub.add_parser("diagnostics", help="curvature report of the demo's digits run: eigenvalue spectra and "
                                              "TracIn-like / influence-like shares per layer and segment")
    diag.add_argument("--output-dir", default="demo_output/diagnostics",
                      help="where checkpoints, curvature.png and curvature.json go")
    diag.add_argument("--epochs", type=int, default=4, help="training epochs (the demo's default)")
    diag.add_argument("--lr", type=float, default=0.05, help="peak learning rate (the demo's default)")
    diag.add_argument("--num-segments", type=int, default=3, help="SOURCE segments L (6 checkpoints)")
    diag.add_argument("--low", type=float, default=0.1, help="c·σ below this is TracIn-like")
    diag.add_argument("--high", type=float, default=10.0, help="c·σ above this is influence-like")
    diag.add_argument("--seed", type=int, default=0)
    diag.add_argument("--no-progress", action="store_true", help="hide progress bars")

    lds = sub.add_parser("lds", help="LDS reproduction of SOURCE's claims at CPU scale "
                                     "(benchmarks/lds_reproduction.py; quick smoke mode by default)")
    mode = lds.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false", help="tiny M, S and queries (default; < 1 min)")
    mode.add_argument("--full", dest="full", action="store_true",
                      help="the full reproduction (tens of minutes on 2 cores; writes benchmarks/results/lds_cpu.*)")
    lds.set_defaults(full=False)
    lds.add_argument("--out-dir", default=None, help="where the CSV/MD/PNG go (quick default: <cache-dir>/quick)")
    lds.add_argument("--cache-dir", default=None, help="retraining cache (default: <repo>/.lds_cache)")
    lds.add_argument("--workers", type=int, default=2, help="retraining worker processes")
    lds.add_argument("--tasks", default=None, help="comma-separated subset of tasks")
    lds.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        for name in ("num_queries", "top_k", "epochs"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        run_demo(args.output_dir, num_queries=args.num_queries, top_k=args.top_k, epochs=args.epochs,
                 seed=args.seed, plot=not args.no_plot, progress=not args.no_progress)
    elif args.command == "diagnostics":
        if args.epochs < 1:
            parser.error(f"--epochs must be >= 1, got {args.epochs}")
        if not 1 <= args.num_segments <= 6:
            parser.error(f"--num-segments must be in [1, 6] (6 checkpoints), got {args.num_segments}")
        if not args.lr > 0:
            parser.error(f"--lr must be > 0, got {args.lr}")
        if not 0 < args.low < args.high:
            parser.error(f"need 0 < --low < --high, got {args.low} and {args.high}")
        _run_diagnostics(args)
    elif args.command == "lds":
        if args.workers < 0:
            parser.error(f"--workers must be >= 0, got {args.workers}")
        forwarded = ["--full" if args.full else "--quick", "--workers", str(args.workers)]
        for flag, value in (("--out-dir", args.out_dir), ("--cache-dir", args.cache_dir), ("--tasks", args.tasks)):
            if value is not None:
                forwarded += [flag, value]
        if args.no_progress:
            forwarded.append("--no-progress")
        return int(_load_lds_script().main(forwarded) or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
