"""The trainer on several processes (torchrun): rank-aware batches, one writer of logs, and sharded
checkpoints that any layout can load. Joining the job and sharding the model: `pyramoe.parallel.launch`.

- Launch: `torchrun --nproc-per-node N -m pyramoe train --ep N [--tp T] ...`, or `pyramoe train
  --nproc-per-node N ...`, which runs torchrun itself. gloo on CPU, NCCL on CUDA.
- Data: every step draws one global batch of batch_size x DP sequences from the run's seeded
  generator (the same on every rank) and each data-parallel rank trains on its slice, so the batch
  stream does not depend on the rank and a resumed run continues it exactly.
- Writing: rank 0 alone prints, writes metrics and config.json; checkpoints are written by all.
- Checkpoints are sharded: every rank writes its own pieces (experts under their global ids,
  tensor-parallel slices, replicated tensors by their lowest holder), weights and Adam moments,
  with no gather (`checkpoint.save_sharded_checkpoint`); under --zero only its FSDP shard of
  them (`fsdp_shards`). Loading reads each rank's part from the
  pieces, so a run saved at EP=4 resumes at EP=2, at EP=2 x TP=2 or in one process.
- Failures: collectives time out after `timeout_s` (default 60 s), so a dead or hung rank ends the
  others with an error instead of a hang; torchrun then stops the job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import pyramoe.train.checkpoint as ckpt_io
from pyramoe.parallel.launch import DistRun
from pyramoe.parallel.sharding import local_rows
from pyramoe.parallel.tensor import tp_layouts
from pyramoe.train.checkpoint import Part, Parts

# -- checkpoints: which part of each full tensor this rank holds -------------------------------------------


def rank_parts(model: nn.Module) -> dict[str, Part]:
    """name -> this rank's `Part` of every tensor that is not whole on it (tensor-parallel slices,
    expert shards), and of every expert tensor (stored one expert at a time even when whole)."""
    out = {
        name: Part(tp=(dim, tuple(blocks), dist.get_rank(group), dist.get_world_size(group)))
        for name, (dim, blocks, group) in tp_layouts(model).items()
    }
    for module_name, module in model.named_modules():
        if not hasattr(module, "expert_offset"):
            continue
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}"
            tp = out[name].tp if name in out else None
            out[name] = Part(experts=(module.expert_offset, param.shape[0]), tp=tp)
    return out


def _parts_by_index(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, Part]:
    """The optimizer's parameter index -> that parameter's `Part` (its moments are split like it).
    By index, not by the optimizer's state: before the first step (a resume) there is none yet."""
    by_name = rank_parts(model)
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: by_name[names[id(p)]] for i, p in enumerate(params) if names.get(id(p)) in by_name}


def _state_index(key: str) -> int:
    """The parameter index of an optimizer tensor named `state.INDEX.NAME`."""
    return int(key.split(".", 2)[1])


def optimizer_rank_parts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Part]:
    """Like `rank_parts`, for the optimizer's `state.INDEX.NAME` tensors (scalars such as step
    counts are whole)."""
    by_index = _parts_by_index(model, optimizer)
    tensors, _ = ckpt_io.optimizer_tensors(optimizer)
    return {key: by_index[_state_index(key)] for key, value in tensors.items()
            if value.dim() > 0 and _state_index(key) in by_index}


def model_parts(model: nn.Module, run: DistRun | None) -> Parts | None:
    """This rank's part of each saved model tensor, by name (None in one process: all of it)."""
    if run is None or run.state is None:
        return None
    return rank_parts(model).get


def optimizer_parts(model: nn.Module, optimizer: torch.optim.Optimizer, run: DistRun | None) -> Parts | None:
    """Like `model_parts`, for optimizer tensors named `state.INDEX.NAME`."""
    if run is None or run.state is None:
        return None
    by_index = _parts_by_index(model, optimizer)
    return lambda key: by_index.get(_state_index(key))


def fsdp_shards(tensors: dict[str, torch.Tensor], parts: dict[str, Part]) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, Part]]:
    """Under --zero: each FSDP-sharded (DTensor) tensor as the rows this rank holds, with its `Part`
    saying which (whole experts of an expert tensor, else `rows`), so a rank writes only its
    shard and the checkpoint still names every piece of the full tensors. No communication."""
    local, out = dict(tensors), dict(parts)
    for name, t in tensors.items():
        rows = local_rows(t)
        if rows is None:
            continue
        local[name] = t.to_local()
        first, end, _ = rows
        part = parts.get(name, Part())
        if part.experts is not None:
            out[name] = dataclasses.replace(part, experts=(part.experts[0] + first, end - first))
        else:
            out[name] = dataclasses.replace(part, rows=rows)
    return local, out


# -- the run directory ---------------------------------------------------------------------------------------


def clean_stale_once(root: Path, run: DistRun | None) -> None:
    """`clean_stale` by rank 0 alone while the others wait: ranks sharing a directory would race
    to rename and delete the same leftovers."""
    if run is None or run.is_main:
        ckpt_io.clean_stale(root)
    if run is not None:
        run.barrier()
