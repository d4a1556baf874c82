"""Which ranks work together: tensor-, data-, expert- and expert-data-parallel groups, and nodes.

Ranks are laid out tensor-parallel innermost (rank = dp_index * tp + tp_index, as Megatron and
DeepSpeed do), so a TP group is a run of adjacent ranks, usually on one node. Among the ranks of one
TP index (a data-parallel group, DP = world / TP ranks), experts of a layer with EP degree `ep` are
spread over consecutive blocks of `ep` data-parallel ranks (an expert-parallel group); the ranks at
the same place in every block hold the same experts (an expert-data-parallel group, DP / ep ranks).
All-to-all runs only inside an expert-parallel group, i.e. among ranks of the same TP index: the
paper's parallelism-coordinated communication.

The rank arithmetic is pure (testable without processes); `ProcessGroups` creates the
torch.distributed groups, which every rank must do in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    tp: int = 1
    ranks_per_node: int | None = None  # None: all ranks on one node

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: {self.rank} is not in [0, {self.world_size})")
        if self.tp < 1 or self.world_size % self.tp:
            raise ValueError(f"tp: {self.tp} does not divide world size {self.world_size}")
        per_node = self.node_size
        if per_node < 1 or self.world_size % per_node:
            raise ValueError(f"ranks_per_node: {per_node} does not divide world size {self.world_size}")

    @property
    def node_size(self) -> int:
        return self.ranks_per_node or self.world_size

    @property
    def dp(self) -> int:
        """Data-parallel degree of the non-expert parameters."""
        return self.world_size // self.tp

    @property
    def tp_index(self) -> int:
        return self.rank % self.tp

    @property
    def dp_index(self) -> int:
        return self.rank // self.tp

    # -- partitions of all ranks (every rank needs all of them to create the groups) ---------------

    def tp_partition(self) -> list[list[int]]:
        return [list(range(d * self.tp, (d + 1) * self.tp)) for d in range(self.dp)]

    def dp_partition(self) -> list[list[int]]:
        return [[d * self.tp + t for d in range(self.dp)] for t in range(self.tp)]

    def ep_partition(self, ep: int) -> list[list[int]]:
        self.check_ep(ep)
        return [dp[b : b + ep] for dp in self.dp_partition() for b in range(0, self.dp, ep)]

    def expert_dp_partition(self, ep: int) -> list[list[int]]:
        self.check_ep(ep)
        return [dp[i::ep] for dp in self.dp_partition() for i in range(ep)]

    def tp_expert_dp_partition(self, ep: int) -> list[list[int]]:
        """Each expert-data-parallel group with the TP ranks of its members: where a gradient that
        every TP rank holds a share of (its tokens' share) is summed in one reduction. At ep=1,
        the whole world."""
        self.check_ep(ep)
        return [sorted(d * self.tp + t for d in range(i, self.dp, ep) for t in range(self.tp)) for i in range(ep)]

    def ep_node_layout(self, ep: int) -> tuple[int, int]:
        """(nodes, ranks per node) of every expert-parallel group of degree `ep`; hierarchical
        all-to-all needs each group to hold the same number of ranks on each of its nodes."""
        layouts = set()
        for ranks in self.ep_partition(ep):
            per_node: dict[int, int] = {}
            for r in ranks:
                per_node[r // self.node_size] = per_node.get(r // self.node_size, 0) + 1
            layouts.add((len(per_node), frozenset(per_node.values())))
        if len(layouts) != 1 or len(next(iter(layouts))[1]) != 1:
            raise ValueError(f"ep: groups of degree {ep} are spread unevenly over nodes of {self.node_size} ranks")
        nodes, counts = next(iter(layouts))
        return nodes, next(iter(counts))

    def ep_local_partition(self, ep: int) -> list[list[int]]:
        """Each EP group split by node: the first hop of hierarchical all-to-all."""
        return [[r for r in ranks if r // self.node_size == node] for ranks in self.ep_partition(ep)
                for node in sorted({r // self.node_size for r in ranks})]

    def ep_cross_partition(self, ep: int) -> list[list[int]]:
        """Within each EP group, the ranks at the same place on their nodes: the second hop."""
        _, per_node = self.ep_node_layout(ep)
        return [ranks[i::per_node] for ranks in self.ep_partition(ep) for i in range(per_node)]

    def node_partition(self) -> list[list[int]]:
        n = self.node_size
        return [list(range(s, s + n)) for s in range(0, self.world_size, n)]

    # -- this rank's view -------------------------------------------------------------------------

    def ep_ranks(self, ep: int) -> list[int]:
        return _containing(self.ep_partition(ep), self.rank)

    def ep_rank(self, ep: int) -> int:
        """Position of this rank in its expert-parallel group: it holds experts [i*E/ep, (i+1)*E/ep)."""
        return self.ep_ranks(ep).index(self.rank)

    def expert_dp_ranks(self, ep: int) -> list[int]:
        return _containing(self.expert_dp_partition(ep), self.rank)

    def check_ep(self, ep: int, where: str = "ep") -> None:
        if ep < 1 or self.dp % ep:
            raise ValueError(
                f"{where}: expert-parallel degree {ep} must divide the data-parallel size {self.dp} "
                f"(world {self.world_size} / tp {self.tp})"
            )


def layer_ep(num_experts: int, ep: int, topology: Topology, layer: int) -> int:
    """A layer's EP degree: the requested one, or its expert count when smaller (DeepSpeed's
    min(ep, num_experts)), checked against the topology and the expert count."""
    degree = min(ep, num_experts)
    where = f"layers[{layer}].ep"
    topology.check_ep(degree, where)
    if num_experts % degree:
        raise ValueError(f"{where}: {num_experts} experts do not split evenly over {degree} ranks")
    return degree


def _containing(partition: list[list[int]], rank: int) -> list[int]:
    return next(ranks for ranks in partition if rank in ranks)


class ProcessGroups:
    """torch.distributed groups for a topology, created on demand. Every rank must ask for the same
    groups in the same order (group creation is collective)."""

    def __init__(self, topology: Topology):
        self.topology = topology
        self._groups: dict[tuple, dist.ProcessGroup | None] = {}

    def _get(self, key: tuple, partition: list[list[int]]) -> dist.ProcessGroup | None:
        if key not in self._groups:
            if self.topology.world_size == 1:
                self._groups[key] = None
            else:
                mine, _ = dist.new_subgroups_by_enumeration(partition)
                self._groups[key] = mine
        return self._groups[key]

    def dp(self) -> dist.ProcessGroup | None:
        return self._get(("dp",), self.topology.dp_partition())

    def tp(self) -> dist.ProcessGroup | None:
        return self._get(("tp",), self.topology.tp_partition())

    def ep(self, ep: int) -> dist.ProcessGroup | None:
        return self._get(("ep", ep), self.topology.ep_partition(ep))

    def expert_dp(self, ep: int) -> dist.ProcessGroup | None:
        return self._get(("expert_dp", ep), self.topology.expert_dp_partition(ep))

    def tp_expert_dp(self, ep: int) -> dist.ProcessGroup | None:
        return self._get(("tp_expert_dp", ep), self.topology.tp_expert_dp_partition(ep))

    def ep_local(self, ep: int) -> dist.ProcessGroup | None:
        return self._get(("ep_local", ep), self.topology.ep_local_partition(ep))

    def ep_cross(self, ep: int) -> dist.ProcessGroup | None:
        return self._get(("ep_cross", ep), self.topology.ep_cross_partition(ep))
