"""The trainer on several processes (torchrun): process group, expert/data parallelism, rank-aware
batches, one writer, and checkpoints that any EP size can load.

- Launch: `torchrun --nproc-per-node N -m pyramoe train --ep N ...`, or `pyramoe train
  --nproc-per-node N ...`, which runs torchrun itself. gloo on CPU, NCCL on CUDA.
- Data: every step draws one global batch of batch_size x DP sequences from the run's seeded
  generator (the same on every rank) and each data-parallel rank trains on its slice, so the batch
  stream does not depend on the rank and a resumed run continues it exactly.
- Writing: rank 0 alone prints, writes metrics, config.json and checkpoints.
- Checkpoints are consolidated: expert shards (weights and Adam moments) are gathered over their
  expert-parallel group and rank 0 writes the single-process layout. Loading slices each rank's
  experts out of it, so a run saved at EP=4 resumes at EP=2 or in one process.
- Failures: collectives time out after `timeout_s` (default 60 s), so a dead or hung rank ends the
  others with an error instead of a hang; torchrun then stops the job.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pyramoe.dist import Topology
from pyramoe.parallel import ParallelState, parallelize
from pyramoe.parallel.tensor import cut_tp, join_tp, tp_layouts

Slicer = Callable[[str, torch.Tensor], torch.Tensor]


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

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """Mean of each value over all ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return (t / self.topology.world_size).tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on one (a stop signal seen by any rank)."""
        t = torch.tensor([1 if flag else 0], device=device)
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
        return DistRun(Topology(world, rank, tp=launch.tp, ranks_per_node=ranks_per_node))
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None


def apply_parallelism(run: DistRun, model: nn.Module, ep: int, hierarchical: bool = False) -> None:
    run.state = parallelize(model, run.topology, ep=ep, hierarchical=hierarchical)


# -- checkpoints: gather on save, slice on load ------------------------------------------------------------


@dataclass
class Shard:
    """How one parameter of this rank relates to the single-process tensor: a run of experts
    (dimension 0, over its expert-parallel group) or a tensor-parallel slice of fused blocks."""

    group: dist.ProcessGroup
    dim: int
    experts: tuple[int, int] | None = None  # (first global expert, experts held)
    blocks: tuple[int, ...] = ()  # TP: full sizes of the fused blocks along `dim`

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=0) if self.experts is not None else join_tp(parts, self.dim, self.blocks)

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        if self.experts is not None:
            start, count = self.experts
            return full[start : start + count]
        return cut_tp(full, self.dim, self.blocks, dist.get_rank(self.group), dist.get_world_size(self.group))


def shards(model: nn.Module, state: ParallelState) -> dict[str, Shard]:
    """name -> Shard for every parameter that is not whole on this rank."""
    out = {name: Shard(group, dim, blocks=blocks) for name, (dim, blocks, group) in tp_layouts(model).items()}
    for module_name, module in model.named_modules():
        if not hasattr(module, "expert_offset"):
            continue
        for leaf, param in module.named_parameters(recurse=False):
            degree = state.expert_ep.get(id(param))
            if degree:
                group = state.groups.ep(degree)
                out[f"{module_name}.{leaf}"] = Shard(group, 0, experts=(module.expert_offset, param.shape[0]))
    return out


def _by_index(model: nn.Module, optimizer: torch.optim.Optimizer, by_name: dict[str, Shard]) -> dict[int, Shard]:
    """Optimizer state index (params in group order, as `state_dict` numbers them) -> Shard."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: by_name[names[id(p)]] for i, p in enumerate(params) if names.get(id(p)) in by_name}


def _index_of(key: str) -> int:
    return int(key.split(".", 2)[1])  # optimizer tensors are named state.INDEX.NAME


def consolidated_model(model: nn.Module, tensors: dict[str, torch.Tensor], run: DistRun) -> dict[str, torch.Tensor]:
    specs = shards(model, run.state)
    return {name: specs[name].gather(t) if name in specs else t for name, t in tensors.items()}


def consolidated_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], run: DistRun
) -> dict[str, torch.Tensor]:
    """Optimizer tensors with sharded parameters' moments gathered like the parameters."""
    specs = _by_index(model, optimizer, shards(model, run.state))
    out = {}
    for key, tensor in tensors.items():
        spec = specs.get(_index_of(key))
        out[key] = spec.gather(tensor) if spec is not None and tensor.dim() > 0 else tensor
    return out


def model_slicer(model: nn.Module, run: DistRun | None) -> Slicer | None:
    """Cuts this rank's part out of a consolidated tensor, by parameter name."""
    if run is None or run.state is None:
        return None
    specs = shards(model, run.state)
    return lambda name, tensor: specs[name].cut(tensor) if name in specs else tensor


def optimizer_slicer(model: nn.Module, optimizer: torch.optim.Optimizer, run: DistRun | None) -> Slicer | None:
    """Like `model_slicer`, for optimizer tensors named `state.INDEX.NAME`."""
    if run is None or run.state is None:
        return None
    specs = _by_index(model, optimizer, shards(model, run.state))

    def cut(key: str, tensor: torch.Tensor) -> torch.Tensor:
        spec = specs.get(_index_of(key))
        return spec.cut(tensor) if spec is not None and tensor.dim() > 0 else tensor

    return cut


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
