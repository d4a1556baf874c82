"""Apply parallelism to a built, single-device model: one `parallelize` step.

- Expert parallelism: each MoE layer's experts sharded over an expert-parallel group, tokens moved
  by all-to-all (flat or hierarchical).
- Tensor parallelism (`topology.tp > 1`): attention heads and dense-MLP hidden units split over the
  TP group (column/row parallel); MoE layers split their tokens over it, route and exchange them
  among ranks of the same TP index, and all-gather the outputs (`pyramoe.parallel.tensor`).
- Data parallelism: every data-parallel rank (group of TP ranks) its own batch.

Gradients: the reference is the mean over data-parallel ranks of each rank's loss, so every
gradient is summed over the ranks that hold a replica of the parameter and divided by DP:
non-expert parameters over the data-parallel group (ranks of the same TP index); expert parameters
over the expert-data-parallel group (their all-to-all backward already summed the contributions of
the whole expert-parallel group's tokens). Under TP, replicated parameters that saw only this
rank's share - an MoE layer's router, Residual-MoE, shared expert and experts (a share of the
tokens), per-head q/k norms (a share of the heads) - are summed over the TP group too (one
reduction over both). The net factor is 1/DP throughout, as in DeepSpeed. The reductions run in
buckets during the backward (`pyramoe.parallel.grad_reduction`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from pyramoe.comm import ProcessGroups, Topology, build_exchange, layer_ep
from pyramoe.layers.moe import MoELayer
from pyramoe.parallel.expert import AllToAllDispatcher
from pyramoe.parallel.grad_reduction import DEFAULT_BUCKET_BYTES, BucketedGradReduction
from pyramoe.parallel.sharding import shard_parameters
from pyramoe.parallel.tensor import SlicedExperts, TPTokenSplit, shard_attention, shard_mlp


@dataclass
class ParallelState:
    """What `parallelize` did: the topology, the groups, and which parameters are shards of what."""

    topology: Topology
    groups: ProcessGroups
    # Ids of live parameters only: recorded after every module swap (a replaced parameter's id may be
    # reused by a new object).
    expert_ep: dict[int, int] = field(default_factory=dict)  # id(param) -> EP degree of its layer
    layer_ep: dict[int, int] = field(default_factory=dict)  # block index -> EP degree
    tp_partial: set[int] = field(default_factory=set)  # its gradient on a TP rank covers a share: sum over TP
    tp_sharded: set[int] = field(default_factory=set)  # a different slice on every TP rank
    # Gradients reduced during the last micro-batch's backward (False: all after it, for timing
    # the difference); buckets of up to bucket_bytes.
    overlap_reduction: bool = True
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    _reduction: BucketedGradReduction | None = None
    # Parameters, gradients and optimizer state sharded by FSDP2 (`pyramoe.parallel.sharding`),
    # which reduces the gradients itself.
    zero: bool = False
    sharded_experts: list[tuple[nn.Module, int]] = field(default_factory=list)  # (experts, EP degree)

    def _key(self, param: nn.Parameter) -> tuple[int, bool]:
        """(EP degree whose expert-data-parallel group reduces it, 1: the data-parallel group;
        whether it is first summed over the TP group)."""
        return self.expert_ep.get(id(param), 1), id(param) in self.tp_partial

    def _reduction_group(self, key: tuple[int, bool]) -> dist.ProcessGroup | None:
        """Where a gradient of reduction `key` is summed: with its TP partners too when it covers
        a share of the tokens or heads (one reduction over both)."""
        ep, tp_sum = key
        if tp_sum:
            return self.groups.tp_expert_dp(ep)
        return self.groups.dp() if ep == 1 else self.groups.expert_dp(ep)

    def gradient_reduction(self, model: nn.Module) -> BucketedGradReduction:
        """The model's bucketed reduction, built (its hooks registered) on first use."""
        if self._reduction is None:
            params = [p for p in _unique_parameters(model) if p.requires_grad]
            self._reduction = BucketedGradReduction.build(
                params, lambda p: (self._key(p), self._reduction_group(self._key(p))), self.topology.dp,
                self.bucket_bytes,
            )
        return self._reduction

    def before_backward(self, model: nn.Module, last: bool) -> None:
        """Call before each micro-batch's backward: the last one's completes the step's gradients,
        which are then reduced during it, bucket by bucket (FSDP: its reduce-scatters; earlier
        micro-batches only accumulate). `sync_gradients` then waits for them."""
        if self.zero:
            model.set_requires_gradient_sync(last)
        elif last and self.topology.world_size > 1 and self.overlap_reduction:
            self.gradient_reduction(model).arm()

    def sync_gradients(self, model: nn.Module) -> None:
        """All-reduce gradients (a missing one counts as zero) and divide by DP: what the backward
        has not reduced already (`before_backward`) is reduced now; returns when all is."""
        if self.zero:
            # FSDP's backward has reduce-scattered them, divided by each group's size: DP/EP for
            # experts, whose reference divisor is DP (see pyramoe.parallel.sharding).
            for experts, degree in self.sharded_experts:
                for param in experts.parameters():
                    if param.grad is not None:
                        _local(param.grad).div_(degree)
            if self.topology.tp > 1:
                self._sum_tp_shares(model)
            return
        if self.topology.world_size == 1:
            return
        self.gradient_reduction(model).finish()

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Global L2 norm of the synced gradients: replicated parameters count once, expert shards
        are summed over their expert-parallel group and TP slices over the TP group."""
        params = _unique_parameters(model)
        # Every bucket's sum lives on the parameters' device: NCCL reduces no CPU tensor, and an
        # empty bucket (a rank whose share of a group holds no gradient) still joins its reduction.
        device = params[0].device
        if self.zero:
            return self._sharded_norm(params, device)
        squares: dict[tuple[int, bool], torch.Tensor] = {}
        for param in params:
            if param.grad is not None:
                key = (self.expert_ep.get(id(param), 1), id(param) in self.tp_sharded)
                square = param.grad.detach().float().square().sum()
                squares[key] = squares[key] + square if key in squares else square
        keys = set(squares) | {(d, False) for d in self.layer_ep.values()}
        if self.tp_sharded:
            keys |= {(1, True)}
        total = torch.zeros((), dtype=torch.float32, device=device)
        for ep, sliced in sorted(keys):
            square = squares.get((ep, sliced))
            if square is None:
                square = torch.zeros((), dtype=torch.float32, device=device)
            if ep > 1:
                dist.all_reduce(square, group=self.groups.ep(ep))
            if sliced:
                dist.all_reduce(square, group=self.groups.tp())
            total = total + square
        return total.sqrt()

    def _sum_tp_shares(self, model: nn.Module) -> None:
        """Under FSDP with TP: sum the sharded gradients of the parameters that saw only this TP
        rank's share (tokens or heads) over the TP group, in one reduction. TP partners of one DP
        index hold the same rows of such a parameter (same shapes, same DP group size), so their
        local shards add up element for element. A missing gradient joins as zeros."""
        params = [p for p in _unique_parameters(model) if p.requires_grad and id(p) in self.tp_partial]
        if not params:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [_local(p.grad) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.groups.tp())
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))

    def _sharded_norm(self, params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
        """Under FSDP every element of a gradient lives on one rank of its data-parallel (or
        expert-data-parallel) group, and expert shards on one rank of their expert-parallel
        group; with TP, TP slices on one rank of the TP group while the other parameters are
        alike on every TP rank (summed over TP already, or whole there): those count on TP rank
        0 only. So the squares sum once over the world."""
        replicas_count = self.topology.tp_index == 0
        total = torch.zeros((), dtype=torch.float32, device=device)
        for param in params:
            if param.grad is not None and (replicas_count or id(param) in self.tp_sharded):
                total = total + _local(param.grad).detach().float().square().sum()
        dist.all_reduce(total)
        return total.sqrt()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = self.grad_norm(model)
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for param in _unique_parameters(model):
            if param.grad is not None:
                _local(param.grad).mul_(scale.to(param.grad.device))
        return norm


def parallelize(
    model: nn.Module,
    topology: Topology,
    ep: int = 1,
    groups: ProcessGroups | None = None,
    hierarchical: bool = False,
    expert_slicing: bool = False,
    zero: bool = False,
    device_type: str = "cpu",
) -> ParallelState:
    """Shard every MoE layer's experts over min(ep, num_experts) ranks and swap in all-to-all
    dispatch (`hierarchical`: node-local hop first when an EP group spans nodes); with
    `topology.tp > 1` also split attention and dense MLPs over the TP group, and MoE layers either
    split their tokens over it (coordinated, default) or their experts' hidden units
    (`expert_slicing`). `zero`: then shard parameters, gradients and optimizer state with FSDP2 on
    `device_type` (`pyramoe.parallel.sharding`). The model must be built identically on every rank
    (same seed or same checkpoint)."""
    groups = groups or ProcessGroups(topology)
    state = ParallelState(topology, groups)
    groups.dp()
    tp_group = groups.tp() if topology.tp > 1 else None
    for index, block in enumerate(getattr(model, "blocks", [])):
        moe = getattr(block, "ffn", None)
        if tp_group is not None:
            sharded, per_head = shard_attention(block.attn, tp_group, index)
            state.tp_sharded.update(id(p) for p in sharded)
            state.tp_partial.update(id(p) for p in per_head)
            if not isinstance(moe, MoELayer):
                state.tp_sharded.update(id(p) for p in shard_mlp(moe, tp_group, f"layers[{index}].ffn"))
        if isinstance(moe, MoELayer):
            _parallelize_moe(moe, index, ep, hierarchical, tp_group, expert_slicing, state)
    # Group creation is collective: every rank creates the reduction groups here, in one order.
    for key in sorted({state._key(p) for p in _unique_parameters(model) if p.requires_grad}):
        state._reduction_group(key)
    if zero and topology.dp > 1:  # at DP=1 there is nothing to shard over
        # FSDP replaces every parameter by a sharded one: the id sets follow them by name.
        named = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        by_name = [{named[i] for i in ids if i in named} for ids in (state.tp_partial, state.tp_sharded)]
        experts = {named[i]: degree for i, degree in state.expert_ep.items() if i in named}
        state.sharded_experts = shard_parameters(model, groups, state.layer_ep, device_type)
        state.zero = True
        params = dict(model.named_parameters(remove_duplicate=False))
        state.tp_partial, state.tp_sharded = ({id(params[n]) for n in names} for names in by_name)
        state.expert_ep = {id(params[n]): degree for n, degree in experts.items()}
    return state


def _parallelize_moe(
    moe: MoELayer, index: int, ep: int, hierarchical: bool, tp_group: dist.ProcessGroup | None,
    expert_slicing: bool, state: ParallelState,
) -> None:
    topology, groups = state.topology, state.groups
    degree = layer_ep(moe.num_experts, ep, topology, index)
    state.layer_ep[index] = degree
    if degree > 1:
        local = moe.num_experts // degree
        moe.experts = moe.experts.shard(topology.ep_rank(degree) * local, local)
        moe.dispatcher = AllToAllDispatcher(build_exchange(groups, degree, hierarchical), local)
        groups.expert_dp(degree)
    if tp_group is not None and expert_slicing:
        moe.experts = SlicedExperts(moe.experts, tp_group, f"layers[{index}]")
        # Tokens are whole on every TP rank: the router and b_out get whole gradients; the slices
        # are summed over TP only in the norm.
        state.tp_sharded.update(id(p) for name, p in moe.experts.named_parameters() if name != "b_out")
    elif tp_group is not None:
        moe.token_split = TPTokenSplit(tp_group)
        state.tp_partial.update(id(p) for p in moe.parameters())
    if degree > 1:
        state.expert_ep.update((id(p), degree) for p in moe.experts.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (FSDP) DTensor, else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())
