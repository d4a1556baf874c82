"""`pyramoe bench train-step --nproc N`: expert-parallel scaling on local processes.

One process with one thread trains on a per-rank batch; then N gloo processes with one thread each
train the same model with its experts spread over them (EP = min(N, experts)), each on its own
batch of that size, gradients synchronised as `pyramoe train` does (and, interleaved with those
steps, with the reduction after the backward instead of overlapped with it: the exposed share of
each). Scaling efficiency is the N
ranks' tokens/s over N times the single process's (1.0: perfect). Each rank also times every
all-to-all it takes part in (forward and backward, counts included), giving the share of the step
spent exchanging tokens.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyramoe.bench.train_setup import build, random_batch
from pyramoe.comm import Topology
from pyramoe.parallel import parallelize
from pyramoe.train.trainer import train_step

# The modules, not the package's same-named function exports.
a2a_module = importlib.import_module("pyramoe.comm.all_to_all")
exchange_module = importlib.import_module("pyramoe.comm.exchange")


class _ExchangeClock:
    """Adds the wall time of every all-to-all (rows and counts, forward and backward) of this process."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._rows, self._counts = a2a_module._exchange, exchange_module._exchange_counts

    def install(self) -> None:
        def timed(fn):  # noqa: ANN001, ANN202
            def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
            return run

        a2a_module._exchange = timed(self._rows)
        exchange_module._exchange_counts = timed(self._counts)


def _steps(setup: dict[str, Any], batch: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace,
           parallel: Any = None, clock: _ExchangeClock | None = None) -> list[dict[str, float]]:
    """Timed steps. On several ranks every round runs one step with the gradient reduction
    overlapped with the backward and one with it after the backward, in alternating order, so both
    see the same machine; each records the time from the end of the backward to the optimizer step."""
    out = []
    for i in range(args.warmup + args.repeats):
        modes = [True] if parallel is None else [i % 2 == 0, i % 2 == 1]
        for overlap in modes:
            if parallel is not None:
                parallel.overlap_reduction = overlap
                dist.barrier()
            before = clock.seconds if clock else 0.0
            start = time.perf_counter()
            stats = train_step(setup["model"], setup["optimizer"], [batch], 1.0, args.precision, parallel=parallel)
            if parallel is not None:
                dist.barrier()
            if i >= args.warmup:
                out.append({"step_s": time.perf_counter() - start, "a2a_s": (clock.seconds if clock else 0.0) - before,
                            "after_backward_s": stats.after_backward_s, "overlap": overlap})
    return out
def _rank(rank: int, world: int, store: str, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        clock = _ExchangeClock()
        clock.install()
        setup = build(args.preset, args)
        state = parallelize(setup["model"], Topology(world, rank), ep=world)
        batch = random_batch(args.vocab_size, args.batch_size, args.seq_len, seed=rank)
        torch.save(_steps(setup, batch, args, state, clock), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_scaling(args: argparse.Namespace) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _steps(build(args.preset, args), random_batch(args.vocab_size, args.batch_size, args.seq_len), args)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.nproc, str(Path(tmp) / "store"), args, tmp), nprocs=args.nproc, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(args.nproc)]
    tokens = args.batch_size * args.seq_len
    t1 = statistics.median(s["step_s"] for s in single)
    overlapped = [[s for s in r if s["overlap"]] for r in ranks]
    tn = statistics.median(max(r[i]["step_s"] for r in overlapped) for i in range(args.repeats))
    share = statistics.median(s["a2a_s"] / s["step_s"] for r in overlapped for s in r)
    # The share of a step spent between the backward's end and the optimizer step (the gradient
    # reduction the backward did not hide, and clipping), overlapped and not.
    exposed = {
        mode: statistics.median(s["after_backward_s"] / s["step_s"] for r in ranks for s in r if s["overlap"] == on)
        for mode, on in (("overlapped", True), ("after_backward", False))
    }
    return {
        "preset": args.preset, "nproc": args.nproc, "tokens_per_rank_step": tokens,
        "single": {"step_s": t1, "tokens_per_s": tokens / t1},
        "parallel": {"step_s": tn, "tokens_per_s": args.nproc * tokens / tn, "a2a_share": share,
                     "exposed_reduction_share": exposed},
        "efficiency": t1 / tn,
        "samples": {"single": single, "ranks": ranks},
    }


def report(result: dict[str, Any]) -> str:
    single, par = result["single"], result["parallel"]
    return (
        f"{result['preset']}: 1 process x 1 thread {single['tokens_per_s']:,.0f} tok/s "
        f"({single['step_s'] * 1e3:.0f} ms/step); {result['nproc']} ranks x 1 thread (EP) "
        f"{par['tokens_per_s']:,.0f} tok/s ({par['step_s'] * 1e3:.0f} ms/step)\n"
        f"scaling efficiency {result['efficiency']:.2f} (1.0 = {result['nproc']}x the single process); "
        f"all-to-all {par['a2a_share']:.1%} of a step (median over ranks and steps)\n"
        f"backward end to optimizer step: {par['exposed_reduction_share']['overlapped']:.1%} of a step with the "
        f"gradient reduction overlapped, {par['exposed_reduction_share']['after_backward']:.1%} with it after "
        f"the backward (interleaved steps)"
    )
