"""Parameter + optimizer-state bytes per rank of `pyramoe train`'s model after one AdamW step, with
and without `--zero` (FSDP2), at 1, 2 and 4 gloo ranks (EP = ranks / TP). Counted from the tensors
each rank holds (its shards), not from the allocator.

    python benchmarks/zero_memory.py [--preset tiny-moe] [--ranks 1,2,4] [--tp 2]
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from pyramoe.bench.train_setup import random_batch
from pyramoe.comm import Topology
from pyramoe.models import GPT
from pyramoe.parallel import parallelize
from pyramoe.presets import get_preset
from pyramoe.train.config import TrainConfig
from pyramoe.train.optim import make_optimizer
from pyramoe.train.trainer import train_step


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    def size(t: torch.Tensor) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()
    moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(size(p) for p in model.parameters()) + sum(size(v) for v in moments)


def _rank(rank: int, world: int, store: str, preset: str, zero: bool, out: str, tp: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    config = get_preset(preset)
    config.vocab_size = 8192  # the tokenizer size `pyramoe train` uses
    torch.manual_seed(0)
    model = GPT(config)
    topology = Topology(world, rank, tp=tp)
    state = parallelize(model, topology, ep=topology.dp, zero=zero) if world > 1 else None
    optimizer = make_optimizer(model, TrainConfig())
    train_step(model, optimizer, [random_batch(config.vocab_size, 2, 32, seed=rank)], parallel=state)
    torch.save(held_bytes(model, optimizer), f"{out}/{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (counts of ranks it divides)")
    args = parser.parse_args()
    print(f"{args.preset}: parameter + AdamW state MiB per rank (max over ranks), TP={args.tp}")
    for world in (int(n) for n in args.ranks.split(",")):
        if world % args.tp:
            continue
        row = []
        for zero in (False, True) if world > 1 else (False,):
            with tempfile.TemporaryDirectory() as tmp:
                tp = args.tp if world > 1 else 1
                mp.spawn(_rank, args=(world, str(Path(tmp) / "store"), args.preset, zero, tmp, tp), nprocs=world)
                most = max(torch.load(Path(tmp) / f"{r}.pt") for r in range(world))
            row.append(f"{'zero' if zero else 'plain'} {most / 2**20:.1f}")
        print(f"  {world} rank(s): " + ", ".join(row))


if __name__ == "__main__":
    main()
