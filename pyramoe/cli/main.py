"""`pyramoe` entry point: dispatches to subcommands; user errors become one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from pyramoe.cli import bench, distill, experiments, export, generate, plan, plot, presets, quantize, serve, train
from pyramoe.cli import eval as eval_cmd
from pyramoe.parallel.launch import DistributedFailure
from pyramoe.runtime import configure_cpu_allocator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyramoe", description="Train, compress and serve Mixture-of-Experts GPT models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (presets, train, distill, eval_cmd, generate, serve, export, quantize, plot, experiments, bench,
                   plan):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = list(argv)  # for commands that relaunch themselves (train --nproc-per-node)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_cpu_allocator()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"pyramoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DistributedFailure as exc:
        print(f"pyramoe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pyramoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
