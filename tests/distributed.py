"""Spawn gloo process groups for tests: a FileStore in tmp_path, one torch thread per rank."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_workers(fn: Callable, world_size: int, tmp_path: Path, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` spawned processes; raises if any rank fails."""
    store = str(tmp_path / f"store-{world_size}")
    mp.spawn(_entry, args=(world_size, store, fn, args), nprocs=world_size, join=True)


def _entry(rank: int, world_size: int, store: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
