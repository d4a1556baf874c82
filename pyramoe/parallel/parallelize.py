"""Apply parallelism to a built, single-device model: one `parallelize` step.

Today: expert parallelism (each MoE layer's experts sharded over an expert-parallel group, tokens
moved by all-to-all) and data parallelism (every rank its own batch; gradients reduced). Tensor
parallelism is not implemented yet (`tp > 1` is refused).

Gradients: the reference is the mean over data-parallel ranks of each rank's loss, so every
gradient is summed over the ranks that hold a replica of the parameter and divided by DP:
non-expert parameters over the data-parallel group; expert parameters over the expert-data-parallel
group (their all-to-all backward already summed the contributions of the tokens of the whole
expert-parallel group). The net factor is 1/DP for both, as in DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pyramoe.dist import ProcessGroups, Topology, build_exchange, layer_ep
from pyramoe.layers.moe import MoELayer
from pyramoe.parallel.expert import AllToAllDispatcher


@dataclass
class ParallelState:
    """What `parallelize` did: the topology, the groups, and which parameters are expert shards."""

    topology: Topology
    groups: ProcessGroups
    expert_ep: dict[int, int] = field(default_factory=dict)  # id(param) -> EP degree of its layer
    layer_ep: dict[int, int] = field(default_factory=dict)  # block index -> EP degree

    def _group_key(self, param: nn.Parameter) -> int:
        return self.expert_ep.get(id(param), 1)

    def _group(self, ep: int) -> dist.ProcessGroup | None:
        return self.groups.dp() if ep == 1 else self.groups.expert_dp(ep)

    def sync_gradients(self, model: nn.Module) -> None:
        """All-reduce gradients (a missing one counts as zero) and divide by DP."""
        if self.topology.world_size == 1:
            return
        buckets: dict[int, list[nn.Parameter]] = {}
        for param in _unique_parameters(model):
            if param.requires_grad:
                buckets.setdefault(self._group_key(param), []).append(param)
        for ep in sorted(buckets):
            params = buckets[ep]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = _flatten_dense_tensors([p.grad for p in params])
            dist.all_reduce(flat, group=self._group(ep))
            flat.div_(self.topology.dp)
            for p, synced in zip(params, _unflatten_dense_tensors(flat, [p.grad for p in params])):
                p.grad.copy_(synced)

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Global L2 norm of the synced gradients: replicated parameters count once, expert shards
        are summed over their expert-parallel group."""
        squares: dict[int, torch.Tensor] = {}
        for param in _unique_parameters(model):
            if param.grad is not None:
                ep = self._group_key(param)
                squares[ep] = squares.get(ep, 0.0) + param.grad.detach().float().square().sum()
        total = torch.zeros(())
        for ep in sorted(set(squares) | set(self.layer_ep.values())):
            square = torch.as_tensor(squares.get(ep, 0.0), dtype=torch.float32)
            if ep > 1:
                dist.all_reduce(square, group=self.groups.ep(ep))
            total = total + square.cpu()
        return total.sqrt()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = self.grad_norm(model)
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for param in _unique_parameters(model):
            if param.grad is not None:
                param.grad.mul_(scale.to(param.grad.device))
        return norm


def parallelize(
    model: nn.Module,
    topology: Topology,
    ep: int = 1,
    groups: ProcessGroups | None = None,
    hierarchical: bool = False,
) -> ParallelState:
    """Shard every MoE layer's experts over min(ep, num_experts) ranks and swap in all-to-all
    dispatch (`hierarchical`: node-local hop first when an EP group spans nodes). The model must be
    built identically on every rank (same seed or same checkpoint)."""
    if topology.tp > 1:
        raise ValueError(f"tp: tensor parallelism is not implemented yet (got tp={topology.tp})")
    groups = groups or ProcessGroups(topology)
    state = ParallelState(topology, groups)
    groups.dp()
    for index, block in enumerate(getattr(model, "blocks", [])):
        moe = getattr(block, "ffn", None)
        if not isinstance(moe, MoELayer):
            continue
        degree = layer_ep(moe.num_experts, ep, topology, index)
        state.layer_ep[index] = degree
        if degree == 1:
            continue
        local = moe.num_experts // degree
        moe.experts = moe.experts.shard(topology.ep_rank(degree) * local, local)
        moe.dispatcher = AllToAllDispatcher(build_exchange(groups, degree, hierarchical), local)
        groups.expert_dp(degree)
        for param in moe.experts.parameters():
            state.expert_ep[id(param)] = degree
    return state


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())
