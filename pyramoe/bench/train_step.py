"""`pyramoe bench train-step`: training tokens/s of MoE presets vs a dense preset with the same active
parameters, interleaved in one run.

A step is what `pyramoe train` does per optimizer step: forward, cross-entropy + aux loss, backward,
gradient clipping and AdamW over the expert/dense parameter groups (pyramoe.train.train_step), on a
fixed batch of random tokens. Presets are timed in alternating order round after round, so slow
drift (thermal, other processes) hits all of them alike; "x baseline" is the median over rounds of
each round's time ratio to the baseline (the last preset, tiny-dense by default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from pyramoe.bench.common import machine_info, native_bf16_matmul, write_json
from pyramoe.bench.scaling import report, run_scaling
from pyramoe.bench.train_setup import build, random_batch
from pyramoe.models import count_active_parameters, count_parameters
from pyramoe.presets import get_preset
from pyramoe.tables import format_table
from pyramoe.train.trainer import train_step

TARGET_RATIO = 1.3  # an MoE step should cost at most this many dense steps of the same active size


def time_interleaved(
    setups: dict[str, dict[str, Any]], batch: tuple[torch.Tensor, torch.Tensor], warmup: int, repeats: int,
    precision: str, log: bool = True,
) -> None:
    """One train step per setup per round, alternating the order every round, so slow drift (thermal,
    other processes) hits every setup alike; appends the timed rounds' milliseconds to setup["times"]."""
    names = list(setups)
    for round_ in range(warmup + repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            setup = setups[name]
            start = time.perf_counter()
            train_step(setup["model"], setup["optimizer"], [batch], grad_clip=1.0, precision=precision)
            elapsed = (time.perf_counter() - start) * 1e3
            if round_ >= warmup:
                setup["times"].append(elapsed)
        if round_ >= warmup and log:
            print(f"  round {round_ - warmup + 1}/{repeats}: "
                  + "  ".join(f"{n} {setups[n]['times'][-1]:.0f} ms" for n in names), file=sys.stderr, flush=True)


def round_ratios(times: list[float], baseline: list[float]) -> list[float]:
    """Each round's time over the baseline's time in the same round."""
    return [t / b for t, b in zip(times, baseline)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    notes = []
    if args.precision == "bf16" and not args.force_bf16:
        ok, detail = native_bf16_matmul()
        if not ok:
            raise ValueError(f"--precision bf16: {detail} (no AVX512-BF16/AMX); --force-bf16 runs it anyway")
    names = [n.strip() for n in args.presets.split(",")]
    setups = {name: build(name, args) for name in names}
    batch = random_batch(args.vocab_size, args.batch_size, args.seq_len)
    tokens = args.batch_size * args.seq_len
    time_interleaved(setups, batch, args.warmup, args.repeats, args.precision)
    baseline = setups[names[-1]]["times"]
    results = []
    for name in names:
        setup = setups[name]
        times = setup["times"]
        median = statistics.median(times)
        results.append({
            "preset": name,
            "params": count_parameters(setup["model"]),
            "active_params": count_active_parameters(setup["model"]),
            "median_ms": median,
            "min_ms": min(times),
            "max_ms": max(times),
            "tokens_per_s": tokens / median * 1e3,
            "x_baseline": statistics.median(round_ratios(times, baseline)),
            "repeats": len(times),
        })
    for r in results[:-1]:
        verdict = "met" if r["x_baseline"] <= TARGET_RATIO else "NOT met"
        notes.append(
            f"{r['preset']}: {r['x_baseline']:.2f}x the {names[-1]} step (target <= {TARGET_RATIO}x: {verdict})"
        )
    return {
        "benchmark": "train-step",
        "shape": dict(batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                      precision=args.precision, tokens_per_step=tokens),
        "baseline": names[-1],
        "machine": machine_info(),
        "notes": notes,
        "results": results,
    }


def print_report(payload: dict[str, Any]) -> None:
    shape, machine = payload["shape"], payload["machine"]
    print(f"train step: batch {shape['batch_size']} x seq {shape['seq_len']} = {shape['tokens_per_step']} tokens, "
          f"vocab {shape['vocab_size']}, {shape['precision']} | torch {machine['torch']}, "
          f"{machine['threads']} threads, {machine['cpu_capability']}")
    rows = [
        [r["preset"], f"{r['params'] / 1e6:.2f}M", f"{r['active_params'] / 1e6:.2f}M", r["median_ms"],
         r["min_ms"], f"{r['tokens_per_s']:,.0f}", r["x_baseline"]]
        for r in payload["results"]
    ]
    headers = ["preset", "params", "active", "median ms", "min ms", "tokens/s", f"x {payload['baseline']}"]
    print(format_table(headers, rows))
    for note in payload["notes"]:
        print(f"note: {note}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="tiny-moe,tiny-dense",
                        help="comma-separated presets; the last one is the baseline")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8192, help="the tokenizer size `pyramoe train` uses")
    parser.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 even without native bf16 matmul")
    parser.add_argument("--nproc", type=int, default=1,
                        help="N > 1: expert-parallel scaling of the first preset on N local processes x 1 thread "
                        "against 1 process x 1 thread on the same per-rank batch (and the all-to-all share)")
    parser.add_argument("--out", default=None,
                        help="JSON output path (default bench-results/train_step.json, or train_step_scaling.json)")


def validate(args: argparse.Namespace) -> None:
    for name in ("batch_size", "seq_len", "vocab_size", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: must be >= 1, got {args.threads}")
    if args.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision: must be fp32 or bf16, got {args.precision!r}")
    if args.nproc < 1:
        raise ValueError(f"--nproc: must be >= 1, got {args.nproc}")
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    if args.nproc > 1 and names:
        args.preset = names[0]
        get_preset(names[0])
        return
    if len(names) < 2:
        raise ValueError("--presets: need at least two presets (the last is the baseline)")
    for name in names:
        get_preset(name)


def main(args: argparse.Namespace) -> int:
    validate(args)
    if args.nproc > 1:
        payload = {"benchmark": "train-step-scaling", "machine": machine_info(), **run_scaling(args)}
        print(report(payload))
        print(f"wrote {write_json(args.out or 'bench-results/train_step_scaling.json', payload)}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = run(args)
    print_report(payload)
    print(f"wrote {write_json(args.out or 'bench-results/train_step.json', payload)}")
    return 0
