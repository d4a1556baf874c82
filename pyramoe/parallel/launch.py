"""Joining a torchrun job: the launch settings, this rank's place, and relaunching under torchrun.

Shared by training and generation: `pyramoe train|generate --nproc-per-node N` re-runs itself under
torchrun; each worker joins with `init_distributed` (gloo on CPU, NCCL on CUDA, collectives that
time out after `timeout_s` so a dead or hung rank ends the others) and `apply_parallelism` shards
the built model.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from pyramoe.comm import Topology, layer_ep
from pyramoe.parallel.parallelize import ParallelState, parallelize


class DistributedFailure(RuntimeError):
    """A rank lost its peers (one died or hung past the timeout): reported in one line, exit 1."""


@dataclass
class Launch:
    """How this process runs: device, expert-parallel degree, collective timeout. Not part of the
    run's settings: the same run may continue on another device or EP size."""

    device: str = "auto"  # auto: cuda when available, else cpu
    ep: int = 1
    timeout_s: float = 60.0
    hierarchical: bool = False  # all-to-all inside each node first, then across nodes
    ranks_per_node: int | None = None  # None: torchrun's LOCAL_WORLD_SIZE; smaller emulates nodes on one box
    tp: int = 1  # tensor-parallel degree: heads, MLP units and MoE tokens split over TP ranks
    expert_slicing: bool = False  # under TP: split every expert's hidden units instead of the MoE tokens
    zero: bool = False  # FSDP2: parameters, gradients and optimizer state sharded over data parallel

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device: must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device: cuda asked for but torch sees no CUDA device")
        return torch.device(self.device)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistRun:
    """This rank's place in a torch.distributed job and what `parallelize` did to its model."""

    topology: Topology
    state: ParallelState | None = None
    # Where this job's collectives take their tensors: the run's GPU under NCCL (which accepts no
    # CPU tensor), the CPU under gloo.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def is_main(self) -> bool:
        return self.topology.rank == 0

    @property
    def dp(self) -> int:
        return self.topology.dp

    def barrier(self) -> None:
        dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """Mean of each value over all ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.topology.world_size).tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop signal seen by any rank)."""
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def rank_slice(self, x: torch.Tensor) -> torch.Tensor:
        """This data-parallel rank's rows of a global batch."""
        per_rank = x.shape[0] // self.dp
        start = self.topology.dp_index * per_rank
        return x[start : start + per_rank]


def init_distributed(launch: Launch, device: torch.device) -> DistRun | None:
    """Join the torchrun job described by the environment; None for a single process."""
    world = world_size_from_env()
    if world == 1:
        if launch.ep > 1 or launch.tp > 1:
            raise ValueError(
                f"--ep/--tp: EP {launch.ep} x TP {launch.tp} needs at least {launch.ep * launch.tp} processes; run "
                f"`pyramoe train --nproc-per-node N ...` or launch with torchrun"
            )
        return None
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=launch.timeout_s),
        )
    ranks_per_node = launch.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    try:
        topology = Topology(world, rank, tp=launch.tp, ranks_per_node=ranks_per_node)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None
    return DistRun(topology, device=collective_device(device))


def collective_device(device: torch.device) -> torch.device:
    """The device collectives use for a run on `device`: the GPU itself (NCCL), else the CPU (gloo)."""
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device()) if device.index is None else device
    return torch.device("cpu")


def check_layout(config: object, nproc: int, launch: Launch) -> None:
    """The checks every rank would make, made once before launching `nproc` local processes: the
    topology fits, each MoE layer's EP degree fits, heads split over TP. ValueError, one line."""
    if nproc < 1:
        raise ValueError(f"--nproc-per-node: must be >= 1, got {nproc}")
    try:
        topology = Topology(nproc, 0, tp=launch.tp, ranks_per_node=launch.ranks_per_node)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None
    for index, layer in enumerate(config.layers):
        if layer.moe is None:
            continue
        degree = layer_ep(layer.moe.num_experts, launch.ep, topology, index)
        if launch.hierarchical and degree > 1:
            try:
                topology.ep_node_layout(degree)  # what `build_exchange` asks of each EP group
            except ValueError as exc:
                raise ValueError(f"--all-to-all hierarchical: layers[{index}].{exc}") from None
    if launch.tp > 1:
        # `kv_heads` resolves n_kv_heads=None (one key/value head per query head); the message
        # names the field a user sets.
        for field_name, heads in (("n_heads", config.n_heads), ("n_kv_heads", config.kv_heads)):
            if heads % launch.tp:
                raise ValueError(f"--tp: model.{field_name}={heads} does not split over {launch.tp} ranks")


def apply_parallelism(
    run: DistRun, model: nn.Module, ep: int, hierarchical: bool = False, expert_slicing: bool = False,
    zero: bool = False,
) -> None:
    run.state = parallelize(model, run.topology, ep=ep, hierarchical=hierarchical, expert_slicing=expert_slicing,
                            zero=zero, device_type=run.device.type)


# -- launching torchrun for one-box users ----------------------------------------------------------------


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `pyramoe ARGV` under torchrun with `nproc` local processes; returns its exit status."""
    if nproc < 1:
        raise ValueError(f"--nproc-per-node: must be >= 1, got {nproc}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "pyramoe", *argv,
    ]
    if shutil.which(sys.executable) is None:
        raise ValueError(f"cannot find the Python interpreter {sys.executable}")
    status = subprocess.call(command)
    if status != 0:
        print(f"pyramoe: torchrun exited with status {status}: a rank failed (its error is above)", file=sys.stderr)
    return status


def argv_without_nproc(argv: list[str]) -> list[str]:
    """argv minus --nproc-per-node N (or =N): what each torchrun worker runs."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            out.append(item)
    return out
