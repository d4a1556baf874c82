"""Expert parallelism: each rank of an expert-parallel group holds E/ep experts of a layer, and
tokens travel to them and back by all-to-all.

Legend: T tokens, D width, K choices, W ranks in the EP group, L experts per rank (E = W * L),
N rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyramoe.comm import Exchange, counts_to_host, transposed_run_order
from pyramoe.comm.exchange import RouteCounts
from pyramoe.layers.dispatch import (
    DispatchPlan,
    ExpertBatch,
    expand_top_k,
    move_rows,
    plan_dispatch,
    weighted_sum_over_choices,
)
from pyramoe.layers.gating import Routing


@dataclass
class _Sent:
    """What combine needs to undo a dispatch."""

    to_expert_major_N: torch.Tensor  # row i of the expert-major buffer is row [i] as received
    sent_splits: list[int]  # rows sent to each rank
    received_splits: list[int]  # rows received from each rank
    back_route: RouteCounts | None  # the exchange's own counts for sending them back


class AllToAllDispatcher:
    """Routes on this rank's tokens, sends each kept assignment to the rank holding its expert, and
    brings the outputs back, over a flat or hierarchical `Exchange`.

    The plan is compact and sorted by global expert id, so the rows for rank q are one contiguous
    run (experts q*L .. q*L+L-1). Counts go first: each rank then knows how many rows it receives
    per (source rank, local expert) and regroups them expert-major for its experts. No capacity
    agreement is needed: each source caps its own assignments, as DeepSpeed's gate does on its
    local tokens, and dropless needs nothing more than the counts.
    """

    def __init__(self, exchange: Exchange, num_local_experts: int):
        self.exchange = exchange
        self.ep_size = exchange.size
        self.num_local_experts = num_local_experts

    def plan(self, routing: Routing, num_experts: int) -> DispatchPlan:
        if num_experts != self.ep_size * self.num_local_experts:
            raise ValueError(f"experts: {num_experts} experts != {self.ep_size} ranks x {self.num_local_experts}")
        return plan_dispatch(routing, num_experts, padded_waste_limit=0.0)

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> ExpertBatch:
        rows_ND = move_rows(expand_top_k(x_TD, plan.top_k), plan.assignment_N, None, plan.num_rows)
        send_counts_WL = plan.tokens_per_expert_E.view(self.ep_size, self.num_local_experts)
        ones = [1] * self.ep_size
        recv_counts_WL, _ = self.exchange(send_counts_WL, ones, ones)  # the count table, on the device
        sent_W, received_W = send_counts_WL.sum(1), recv_counts_WL.sum(1)
        # What the exchange needs besides the splits (the hierarchical one: each hop-1 count table),
        # exchanged now for both ways: the combine sends back what arrived.
        routes = [self.exchange.route_counts(sent_W), self.exchange.route_counts(received_W)]
        # The layer's one wait for the device: the row splits both ways, the local experts' row
        # counts and the exchange's own counts, in one copy.
        tokens_L = recv_counts_WL.sum(0)
        sent, received, host_L, *route_host = counts_to_host(
            sent_W, received_W, tokens_L, *(r.table for r in routes if r is not None)
        )
        for route, host in zip((r for r in routes if r is not None), route_host):
            route.host = host
        received_ND, _ = self.exchange(rows_ND, sent, received, routes[0])
        order_N = transposed_run_order(recv_counts_WL, sum(received))
        local_ND = move_rows(received_ND, order_N, None, order_N.numel())
        return ExpertBatch(local_ND, tokens_L, None, _Sent(order_N, sent, received, routes[1]), host_L)

    def combine(self, y_rows: torch.Tensor, batch: ExpertBatch, plan: DispatchPlan) -> torch.Tensor:
        sent: _Sent = batch.handle
        by_source_ND = move_rows(y_rows, None, sent.to_expert_major_N, y_rows.shape[0])
        back_ND, _ = self.exchange(by_source_ND, sent.received_splits, sent.sent_splits, sent.back_route)
        y_AD = move_rows(back_ND, None, plan.assignment_N, plan.num_tokens * plan.top_k)
        return weighted_sum_over_choices(y_AD, plan)
