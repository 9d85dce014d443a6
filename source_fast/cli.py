"""Command line: `source-fast demo` (also `python -m source_fast demo`)."""
from __future__ import annotations

import argparse
import sys


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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        for name in ("num_queries", "top_k", "epochs"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        run_demo(args.output_dir, num_queries=args.num_queries, top_k=args.top_k, epochs=args.epochs,
                 seed=args.seed, plot=not args.no_plot, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
