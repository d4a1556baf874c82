"""`pyramoe plan PRESET`: the fewest GPUs that hold a model and how to lay it out on them.

Prints the smallest GPU count that holds the preset (parameters, optimizer state and activations for
training; parameters and KV cache for inference), the TP/DP degrees, whether the MoE layers split
their tokens or their experts' hidden units over TP (expert-slicing; --no-expert-slicing keeps
experts whole), each MoE layer's EP degree and all-to-all scheme (flat or hierarchical, from the
alpha-beta cost model) and the predicted latency per training step or generated token, with every
assumption. See pyramoe/parallel/planner.py.
"""

from __future__ import annotations

import argparse
import re

from pyramoe.parallel.planner import GB, Hardware, ModelSizes, Plan, Workload, make_plan
from pyramoe.presets import get_preset
from pyramoe.tables import format_table

_UNITS = {"": GB, "gb": GB, "gib": 2**30, "tb": 1e12, "mb": 1e6, "mib": 2**20}


def parse_memory(text: str) -> float:
    """'80GB', '80', '40GiB' -> bytes (GB = 1e9, the GPU datasheets' unit)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--gpu-memory: expected a size like 80GB or 40GiB, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("plan", help="fewest GPUs for a preset, its EP/TP/DP layout, all-to-all and latency",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="a preset name (pyramoe presets)")
    parser.add_argument("--gpus", type=int, help="plan for this many GPUs (default: the smallest count that fits)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 32GB, 40GiB")
    parser.add_argument("--mode", default="inference", help="train or inference")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context)")
    parser.add_argument("--micro-batch", type=int, default=1, help="train: sequences per data-parallel rank")
    parser.add_argument("--batch", type=int, default=8, help="inference: sequences decoding per data-parallel rank")
    parser.add_argument("--no-expert-slicing", dest="expert_slicing", action="store_false",
                        help="never split experts' hidden units over TP (MoE layers split their tokens instead)")
    parser.add_argument("--zero", action="store_true",
                        help="train: parameters, gradients and Adam moments sharded over data parallel "
                        "(`pyramoe train --zero`)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    config = get_preset(args.preset)
    hardware = Hardware(gpus_per_node=args.gpus_per_node, gpu_memory_bytes=parse_memory(args.gpu_memory))
    if args.zero and args.mode != "train":
        raise ValueError("--zero: only with --mode train (it shards training state)")
    workload = Workload(mode=args.mode, seq_len=args.seq_len, micro_batch=args.micro_batch, batch=args.batch,
                        zero=args.zero)
    plan, smallest, sizes = make_plan(config, hardware, workload, args.gpus, args.expert_slicing)
    print(f"plan: {args.preset} ({sizes.total / 1e9:.2f}B parameters, {sizes.active / 1e9:.2f}B active per token), "
          f"{workload.mode}, {hardware.gpu_memory_bytes / GB:g} GB GPUs, {hardware.gpus_per_node} per node")
    slicing = ", expert-slicing" if smallest.expert_slicing else ""
    print(f"smallest GPU count that holds it: {smallest.gpus} (TP={smallest.tp}{slicing}, DP={smallest.dp}, "
          f"{smallest.memory_total / GB:.1f} GB per GPU)")
    print_plan(plan, sizes, hardware, workload)
    return 0


def print_plan(plan: Plan, sizes: ModelSizes, hardware: Hardware, workload: Workload) -> None:
    usable = hardware.gpu_memory_bytes * hardware.usable_fraction / GB
    parts = ", ".join(f"{name} {value / GB:.1f} GB" for name, value in plan.memory.items())
    sliced = "attention, dense MLPs, experts' hidden units" if plan.expert_slicing else "attention, dense MLPs"
    print(f"\non {plan.gpus} GPUs: TP={plan.tp} ({sliced}), DP={plan.dp}; per GPU {parts} = "
          f"{plan.memory_total / GB:.1f} of {usable:.1f} GB usable")
    groups: dict[tuple, list[int]] = {}
    for index, ep in plan.layer_ep.items():
        experts, _ = sizes.experts[index]
        per_gpu = f"{experts // ep} x 1/{plan.tp}" if plan.expert_slicing else experts // ep
        groups.setdefault((experts, ep, plan.dp // ep, per_gpu, plan.all_to_all[index]), []).append(index)
    rows = [[",".join(map(str, layers)), *key] for key, layers in groups.items()]
    if rows:
        print(format_table(["MoE layers", "experts", "EP", "expert DP", "experts per GPU", "all-to-all"], rows))
    unit = "training step" if workload.mode == "train" else "generated token (decode step)"
    print(f"predicted time per {unit}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in plan.latency.items())
          + f"; sum {sum(plan.latency.values()) * 1e3:.3f} ms")
    print("assumptions:")
    for line in hardware.describe():
        print(f"  - {line}")
    seq = workload.seq_len or sizes.config.max_seq_len
    if workload.mode == "train":
        zero = ("sharded over DP (--zero, FSDP2), plus the largest expert shard gathered whole" if workload.zero
                else "no ZeRO")
        print(f"  - {workload.param_bytes} bytes per parameter (fp32 weights, gradients, Adam m and v; {zero}), "
              f"activations of {workload.micro_batch} x {seq} tokens (Korthikanti et al. 2022, no recomputation, "
              "16-bit) plus fp32 logits")
    else:
        print(f"  - {workload.param_bytes} bytes per parameter (16-bit weights), KV cache of {workload.batch} "
              f"sequences x {seq} tokens in 16 bits; other activations ignored")
    print("  - placement as pyramoe.parallel.parallelize: experts over EP = min(DP, experts); under TP the MoE "
          "layers split their tokens (coordinated) or, where that does not fit, every expert's hidden units "
          "(expert-slicing: an all-to-all of all tokens and an all-reduce of the expert outputs); the rest "
          "replicated; rows spread evenly over experts; gradient all-reduce, "
          "overlap and kernel time not modelled")
