"""`pyramoe bench NAME`: benchmark programs that measure pyramoe and its peers in one run."""

from __future__ import annotations

import argparse

from pyramoe.bench import all_to_all, generate, long_context, moe_layer, serve, train_step

# name -> (module with add_arguments/main and a docstring, one-line help)
BENCHMARKS = {
    "moe-layer": (moe_layer, "one MoE layer: sparse vs einsum vs DeepSpeed vs the dense-FFN limit"),
    "train-step": (train_step, "training tokens/s: tiny-moe vs tiny-dense (same active parameters), interleaved"),
    "all-to-all": (all_to_all, "MoE all-to-all on gloo or NCCL ranks: flat vs hierarchical vs coordinated, cost model"),
    "generate": (generate, "generation tokens/s: the engine vs transformers vs a plain MoE vs the roofline"),
    "long-context": (long_context, "decode tokens/s of the native step with the cache at 128, 1K, 4K positions"),
    "serve": (serve, "pyramoe serve under 1-64 streaming clients vs the engine in-process; long prompts arriving"),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (pyramoe vs peers, same run)")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        bench = benches.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(bench)
        bench.set_defaults(func=module.main)
