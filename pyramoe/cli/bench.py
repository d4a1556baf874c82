"""`pyramoe bench NAME`: benchmark programs that measure pyramoe and its peers in one run."""

from __future__ import annotations

import argparse

from pyramoe.bench import moe_layer, train_step


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
    step = benches.add_parser(
        "train-step",
        help="training tokens/s: tiny-moe vs tiny-dense (same active parameters), interleaved",
        description=train_step.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_step.add_arguments(step)
    step.set_defaults(func=train_step.main)
