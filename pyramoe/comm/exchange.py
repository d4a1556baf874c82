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


@dataclass
class RouteCounts:
    """An exchange's own counts for one call, exchanged ahead on the device (`route_counts`) so
    that the caller brings them to the host together with its own, in one copy."""

    sizes: torch.Tensor  # rows this rank sends each group rank, on the device
    table: torch.Tensor  # the exchange's counts, on the device
    host: list[int] | None = None  # `table` on the host, filled in by the caller


class Exchange(Protocol):
    size: int  # ranks in the group

    def __call__(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int] | None = None,
        route: RouteCounts | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Rows x[send run q] go to rank q; returns the rows received (source order) and their counts.
        `recv_splits`, when the caller knows them, saves a round of counts (the flat exchange's only
        one, the hierarchical exchange's second, and both when every split is the same); `route`
        (from `route_counts`, its host copy filled in) saves the exchange its own wait."""
        ...

    def route_counts(self, sizes: torch.Tensor) -> RouteCounts | None:
        """The counts a call sending `sizes` (rows per group rank, int64 on the device) will need
        besides the receive splits, exchanged now on the device; None when it needs none."""
        ...


def _exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Equal-split all-to-all of a [size, k] int64 table (row q goes to rank q), on the table's
    device (the rows' device: NCCL takes no CPU tensor)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out.view(-1), counts.contiguous().view(-1), group=group)
    return out


def _count_table(splits: list[int], like: torch.Tensor) -> torch.Tensor:
    """`splits` as an int64 tensor on `like`'s device."""
    return torch.tensor(splits, dtype=torch.int64, device=like.device)


@dataclass
class FlatExchange:
    group: dist.ProcessGroup | None
    size: int

    def __call__(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int] | None = None,
        route: RouteCounts | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        if recv_splits is None:
            sent = _count_table(send_splits, x).view(-1, 1)
            recv_splits = _exchange_counts(sent, self.group).view(-1).tolist()  # host sync: the splits
        return all_to_all(x, recv_splits, send_splits, self.group), recv_splits

    def route_counts(self, sizes: torch.Tensor) -> None:
        return None  # one hop: the receive splits are all it needs


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

    def route_counts(self, sizes: torch.Tensor) -> RouteCounts:
        """The first hop's counts (`got_GN` below) of a call sending `sizes`."""
        sizes_NG = sizes.view(self.nodes, self.per_node)
        return RouteCounts(sizes_NG, _exchange_counts(sizes_NG.t().contiguous(), self.local_group))

    def __call__(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int] | None = None,
        route: RouteCounts | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        n_nodes, g_local = self.nodes, self.per_node
        if recv_splits is not None and len(set(send_splits) | set(recv_splits)) == 1:
            return self._equal_splits(x, send_splits[0]), list(recv_splits)
        if route is None:
            route = self.route_counts(_count_table(send_splits, x))
        # sizes_NG[n', g']: rows this rank sends to (n', g'), as given (destination order).
        sizes_NG = route.sizes.view(n_nodes, g_local)
        # Hop 1, inside the node: local rank g' gets the rows for (n', g') for every n'. Reorder this
        # rank's rows to [g'][n'] runs first.
        by_local = _transpose_runs(x, sizes_NG, sum(send_splits))
        # got_GN[g, n']: rows local source g sends me for (n', my local index).
        got_GN = route.table
        got = route.host if route.host is not None else got_GN.reshape(-1).tolist()  # host sync: hop 1's counts
        sent_1 = [sum(send_splits[n * g_local + g] for n in range(n_nodes)) for g in range(g_local)]
        received_1 = [sum(got[g * n_nodes : (g + 1) * n_nodes]) for g in range(g_local)]
        sent_2 = [sum(got[g * n_nodes + n] for g in range(g_local)) for n in range(n_nodes)]
        hop1 = all_to_all(by_local, received_1, sent_1, self.local_group)
        # Layout transform: [local source g][destination node n'] -> [n'][g].
        by_node = _transpose_runs(hop1, got_GN, sum(received_1))
        # Hop 2, across nodes: node n' gets, from every local source g here, its rows for (n', me).
        if recv_splits is None:
            got_NG = _exchange_counts(got_GN.t().contiguous(), self.cross_group)  # [source node n][source g]
            recv_splits = got_NG.reshape(-1).tolist()  # host sync: the splits
        received_N = [sum(recv_splits[n * g_local : (n + 1) * g_local]) for n in range(n_nodes)]
        out = all_to_all(by_node, received_N, sent_2, self.cross_group)
        return out, list(recv_splits)

    def _equal_splits(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Every rank sends `rows` rows to every rank (a count table): all sizes are known, no
        count is exchanged and nothing waits on the device."""
        n_nodes, g_local = self.nodes, self.per_node
        sizes = torch.full((n_nodes, g_local), rows, dtype=torch.int64, device=x.device)
        hop1 = all_to_all(_transpose_runs(x, sizes, x.shape[0]), [rows * n_nodes] * g_local,
                          [rows * n_nodes] * g_local, self.local_group)
        by_node = _transpose_runs(hop1, sizes.t(), hop1.shape[0])  # [local source][node] -> [node][local source]
        return all_to_all(by_node, [rows * g_local] * n_nodes, [rows * g_local] * n_nodes, self.cross_group)


def counts_to_host(*counts: torch.Tensor) -> list[list[int]]:
    """Several count vectors as lists, in one device-to-host copy."""
    lengths = [c.numel() for c in counts]
    flat = torch.cat([c.reshape(-1) for c in counts]).tolist()
    out, start = [], 0
    for n in lengths:
        out.append(flat[start : start + n])
        start += n
    return out


def _transpose_runs(x: torch.Tensor, sizes_AB: torch.Tensor, rows: int) -> torch.Tensor:
    """x holds runs laid out [a][b] with sizes_AB[a, b] rows each (`rows` in all); returns them laid
    out [b][a]."""
    return x.index_select(0, transposed_run_order(sizes_AB, rows))


def transposed_run_order(sizes_AB: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Row indices that reorder runs laid out [a][b] (sizes_AB[a, b] rows each, kept in order) into
    [b][a]; e.g. rows received [source rank][local expert] into [local expert][source rank].
    `rows`, the total when the caller knows it, keeps the computation on the device (no sync)."""
    flat = sizes_AB.reshape(-1)
    starts_AB = (torch.cumsum(flat, 0) - flat).view_as(sizes_AB)
    runs = sizes_AB.t().reshape(-1)
    run_starts = starts_AB.t().reshape(-1)
    if rows is None:
        rows = int(runs.sum())  # host sync
    first_of_run = torch.repeat_interleave(torch.cumsum(runs, 0) - runs, runs, output_size=rows)
    within = torch.arange(rows, device=sizes_AB.device) - first_of_run
    return torch.repeat_interleave(run_starts, runs, output_size=rows) + within


def build_exchange(groups: object, ep: int, hierarchical: bool) -> Exchange:
    """The exchange for an EP group of degree `ep`: hierarchical when asked and the group spans
    more than one node (on one node it is the flat one). `groups` is a `ProcessGroups`."""
    topology = groups.topology
    nodes, per_node = topology.ep_node_layout(ep)
    if hierarchical and nodes > 1:
        return HierarchicalExchange(groups.ep_local(ep), groups.ep_cross(ep), nodes, per_node)
    return FlatExchange(groups.ep(ep), ep)
