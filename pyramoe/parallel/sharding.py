"""ZeRO-style sharding with torch's FSDP2 (`fully_shard`), composed with expert parallelism the way
torchtitan composes them: each MoE layer's expert shard is sharded again over its
expert-data-parallel group, every block and then the rest of the model over the data-parallel
group. Parameters, gradients and AdamW moments are then held 1/DP per rank (experts 1/(DP/EP)
of their EP shard); FSDP all-gathers a block's parameters for its forward and backward and
reduce-scatters its gradients during the backward (its own overlap).

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
from torch.distributed.tensor import DTensor

from pyramoe.comm import ProcessGroups, Topology
from pyramoe.layers.moe import MoELayer


def shard_parameters(model: nn.Module, topology: Topology, groups: ProcessGroups, layer_ep: dict[int, int],
                     device_type: str) -> list[tuple[nn.Module, int]]:
    """Apply FSDP2 to a model `parallelize` has sharded by experts (not by TP: see the check).
    Returns each expert-parallel layer's experts module with its EP degree."""
    if topology.tp > 1:
        raise ValueError("--zero: not with --tp > 1 yet (TP-share gradients would need a sum over TP first)")
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


def gather_full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each DTensor gathered whole (what this rank holds without the sharding: its experts, all
    the rest), so checkpoints keep the unsharded layout and reshard across world sizes. Every
    rank calls it on the same names (the gathers are collective)."""
    return {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in tensors.items()}
