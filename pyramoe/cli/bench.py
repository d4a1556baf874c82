"""`pyramoe bench NAME`: benchmark programs that measure pyramoe and its peers in one run."""

from __future__ import annotations

import argparse

from pyramoe.bench import moe_layer


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (pyramoe vs peers, same run)")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    layer = benches.add_parser(
        "moe-layer",
        help="one MoE layer: sparse vs einsum vs DeepSpeed vs the dense-FFN limit",
        description=moe_layer.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    moe_layer.add_arguments(layer)
    layer.set_defaults(func=moe_layer.main)
