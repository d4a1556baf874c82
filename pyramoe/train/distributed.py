"""The trainer on several processes (torchrun): rank-aware batches, one writer, and checkpoints that
any layout can load. Joining the job and sharding the model: `pyramoe.parallel.launch`.

- Launch: `torchrun --nproc-per-node N -m pyramoe train --ep N [--tp T] ...`, or `pyramoe train
  --nproc-per-node N ...`, which runs torchrun itself. gloo on CPU, NCCL on CUDA.
- Data: every step draws one global batch of batch_size x DP sequences from the run's seeded
  generator (the same on every rank) and each data-parallel rank trains on its slice, so the batch
  stream does not depend on the rank and a resumed run continues it exactly.
- Writing: rank 0 alone prints, writes metrics, config.json and checkpoints.
- Checkpoints are consolidated: expert shards and tensor-parallel slices (weights and Adam moments)
  are gathered over their group and rank 0 writes the single-process layout. Loading cuts each
  rank's part out of it, so a run saved at EP=4 resumes at EP=2, at EP=2 x TP=2 or in one process.
- Failures: collectives time out after `timeout_s` (default 60 s), so a dead or hung rank ends the
  others with an error instead of a hang; torchrun then stops the job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pyramoe.parallel import ParallelState
from pyramoe.parallel.launch import DistRun
from pyramoe.parallel.tensor import cut_tp, join_tp, tp_layouts

Slicer = Callable[[str, torch.Tensor], torch.Tensor]


# -- checkpoints: gather on save, slice on load ------------------------------------------------------------


@dataclass
class Shard:
    """How one parameter of this rank relates to the single-process tensor: a run of experts
    (dimension 0, over its expert-parallel group), a tensor-parallel slice of fused blocks, or both
    (expert-slicing under EP)."""

    experts: tuple[dist.ProcessGroup, int, int] | None = None  # (EP group, first global expert, held)
    tp: tuple[dist.ProcessGroup, int, tuple[int, ...]] | None = None  # (TP group, dim, full block sizes)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        t = local
        if self.tp is not None:
            group, dim, blocks = self.tp
            t = join_tp(_all_gather(t, group), dim, blocks)
        if self.experts is not None:
            t = torch.cat(_all_gather(t, self.experts[0]), dim=0)
        return t

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        t = full
        if self.experts is not None:
            _, start, count = self.experts
            t = t[start : start + count]
        if self.tp is not None:
            group, dim, blocks = self.tp
            t = cut_tp(t, dim, blocks, dist.get_rank(group), dist.get_world_size(group))
        return t


def _all_gather(t: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def shards(model: nn.Module, state: ParallelState) -> dict[str, Shard]:
    """name -> Shard for every parameter that is not whole on this rank."""
    out = {name: Shard(tp=(group, dim, blocks)) for name, (dim, blocks, group) in tp_layouts(model).items()}
    for module_name, module in model.named_modules():
        if not hasattr(module, "expert_offset"):
            continue
        for leaf, param in module.named_parameters(recurse=False):
            degree = state.expert_ep.get(id(param))
            if degree:
                name = f"{module_name}.{leaf}"
                tp = out[name].tp if name in out else None
                out[name] = Shard(experts=(state.groups.ep(degree), module.expert_offset, param.shape[0]), tp=tp)
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


