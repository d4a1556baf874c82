"""How rows travel between the ranks of an expert-parallel group: flat or hierarchical all-to-all.

Legend: p ranks in the group = N nodes x G ranks per node; rank (n, g) is the g-th of node n.

Both give the same result - each rank receives the rows every rank sent it, in source-rank order -
and both are differentiable (the backward is the same exchange in reverse).

- Flat: one all_to_all_single over the group; every rank talks to p - 1 peers.
- Hierarchical (the DeepSpeed-MoE paper, section 5): first an all-to-all inside each node, in
  which rank (n, g) hands local rank g' every row bound for a rank (n', g') of any node; then an
  all-to-all among the ranks with the same local index across nodes. A rank talks to G - 1 + N - 1
  peers instead of p - 1, trading a second, node-local hop for far fewer cross-node messages. A
  layout transform between the hops turns [local source][destination node] into
  [destination node][local source], so the output order is the flat one: bit-identical results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from pyramoe.comm.all_to_all import all_to_all


class Exchange(Protocol):
    size: int  # ranks in the group

    def __call__(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Rows x[send run q] go to rank q; returns the rows received (source order) and their counts.
        `recv_splits`, when the caller knows them, saves the flat exchange a round of counts."""
        ...


def _exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Equal-split all-to-all of a [size, k] int64 table (row q goes to rank q)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out.view(-1), counts.contiguous().view(-1), group=group)
    return out


@dataclass
class FlatExchange:
    group: dist.ProcessGroup | None
    size: int

    def __call__(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        if recv_splits is None:
            sent = torch.tensor(send_splits, dtype=torch.int64).view(-1, 1)
            recv_splits = _exchange_counts(sent, self.group).view(-1).tolist()
        return all_to_all(x, recv_splits, send_splits, self.group), recv_splits


@dataclass
class HierarchicalExchange:
    """Two hops: `local_group` (the G group ranks of this node, by local index) then `cross_group`
    (the N group ranks sharing this local index, by node). Group rank q is (q // G, q % G)."""

    local_group: dist.ProcessGroup | None
    cross_group: dist.ProcessGroup | None
    nodes: int
    per_node: int

    @property
    def size(self) -> int:
        return self.nodes * self.per_node

    def __call__(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        n_nodes, g_local = self.nodes, self.per_node
        # sizes_NG[n', g']: rows this rank sends to (n', g'), as given (destination order).
        sizes_NG = torch.tensor(send_splits, dtype=torch.int64).view(n_nodes, g_local)
        # Hop 1, inside the node: local rank g' gets the rows for (n', g') for every n'. Reorder this
        # rank's rows to [g'][n'] runs first.
        by_local = _transpose_runs(x, sizes_NG)
        # got_GN[g, n']: rows local source g sends me for (n', my local index).
        got_GN = _exchange_counts(sizes_NG.t().contiguous(), self.local_group)
        hop1 = all_to_all(by_local, got_GN.sum(1).tolist(), sizes_NG.sum(0).tolist(), self.local_group)
        # Layout transform: [local source g][destination node n'] -> [n'][g].
        by_node = _transpose_runs(hop1, got_GN)
        # Hop 2, across nodes: node n' gets, from every local source g here, its rows for (n', me).
        got_NG = _exchange_counts(got_GN.t().contiguous(), self.cross_group)  # [source node n][source g]
        out = all_to_all(by_node, got_NG.sum(1).tolist(), got_GN.sum(0).tolist(), self.cross_group)
        return out, got_NG.reshape(-1).tolist()


def _transpose_runs(x: torch.Tensor, sizes_AB: torch.Tensor) -> torch.Tensor:
    """x holds runs laid out [a][b] with sizes_AB[a, b] rows each; returns them laid out [b][a]."""
    return x.index_select(0, transposed_run_order(sizes_AB).to(x.device))


def transposed_run_order(sizes_AB: torch.Tensor) -> torch.Tensor:
    """Row indices that reorder runs laid out [a][b] (sizes_AB[a, b] rows each, kept in order) into
    [b][a]; e.g. rows received [source rank][local expert] into [local expert][source rank]."""
    flat = sizes_AB.reshape(-1)
    starts_AB = (torch.cumsum(flat, 0) - flat).view_as(sizes_AB)
    runs = sizes_AB.t().reshape(-1)
    run_starts = starts_AB.t().reshape(-1)
    first_of_run = torch.repeat_interleave(torch.cumsum(runs, 0) - runs, runs)
    within = torch.arange(int(runs.sum()), device=sizes_AB.device) - first_of_run
    return torch.repeat_interleave(run_starts, runs) + within


def build_exchange(groups: object, ep: int, hierarchical: bool) -> Exchange:
    """The exchange for an EP group of degree `ep`: hierarchical when asked and the group spans
    more than one node (on one node it is the flat one). `groups` is a `ProcessGroups`."""
    topology = groups.topology
    nodes, per_node = topology.ep_node_layout(ep)
    if hierarchical and nodes > 1:
        return HierarchicalExchange(groups.ep_local(ep), groups.ep_cross(ep), nodes, per_node)
    return FlatExchange(groups.ep(ep), ep)
