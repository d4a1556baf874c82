"""ZeRO-style sharding with torch's FSDP2 (`fully_shard`), composed with expert and tensor
parallelism the way torchtitan composes them: each MoE layer's expert shard is sharded again over
its expert-data-parallel group, every block and then the rest of the model over the data-parallel
group. Parameters, gradients and AdamW moments are then held 1/DP per rank (experts 1/(DP/EP)
of their EP shard); FSDP all-gathers a block's parameters for its forward and backward and
reduce-scatters its gradients during the backward (its own overlap).

Tensor parallelism here is not DTensor-based (`pyramoe.parallel.tensor` slices plain parameters
and runs its own TP collectives), so there is no 2-D (dp, tp) mesh to give FSDP: each TP rank's
parameters - its TP slices and its copies of the replicated ones - are sharded over that rank's
data-parallel group (the ranks of the same TP index), which is the dp dimension of torchtitan's
2-D mesh. TP partners with the same DP index then hold the same rows of a replicated parameter,
so a gradient that covers only a TP rank's share (`ParallelState.tp_partial`) is completed by
summing the sharded gradients over the TP group after FSDP's reduce-scatter.

Gradients keep the engine's reference (the mean over data-parallel ranks): FSDP divides a
reduce-scatter by its group's size, which for an expert-data-parallel group is DP/EP, so expert
gradients are divided by EP after it (`ParallelState.sync_gradients`). FSDP's own divide factor
would do it in the reduction, but as a PREMUL_SUM, which gloo does not have.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from pyramoe.comm import ProcessGroups
from pyramoe.layers.moe import MoELayer


def shard_parameters(model: nn.Module, groups: ProcessGroups, layer_ep: dict[int, int],
                     device_type: str) -> list[tuple[nn.Module, int]]:
    """Apply FSDP2 to a model `parallelize` has sharded by experts and TP. Returns each
    expert-parallel layer's experts module with its EP degree."""
    dp_mesh = DeviceMesh.from_group(groups.dp(), device_type)
    sharded_experts = []
    for index, block in enumerate(model.blocks):
        degree = layer_ep.get(index, 1)
        if isinstance(block.ffn, MoELayer) and degree > 1:
            experts = block.ffn.experts
            fully_shard(experts, mesh=DeviceMesh.from_group(groups.expert_dp(degree), device_type))
            sharded_experts.append((experts, degree))
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return sharded_experts


def local_rows(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(first, end, total) rows along dimension 0 that this rank holds of an FSDP-sharded DTensor
    (FSDP2 splits as torch.chunk does: ceil(total/size) rows each, the last ranks fewer or none);
    None for a plain tensor."""
    if not isinstance(t, DTensor):
        return None
    assert tuple(t.placements) == (Shard(0),), t.placements  # FSDP2's layout on a 1-D mesh
    total = t.shape[0]
    size, rank = t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-total // size)
    first, end = min(rank * chunk, total), min((rank + 1) * chunk, total)
    assert t.to_local().shape[0] == end - first, (t.to_local().shape, first, end)
    return first, end, total
