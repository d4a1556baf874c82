"""`pyramoe plot RUN_DIR`: PNGs of train/validation loss and of the per-layer expert load."""

from __future__ import annotations

import argparse

from pyramoe.train.plot import plot_run


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("plot", help="plot a run's losses and expert load (PNG)", description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/plots)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0
