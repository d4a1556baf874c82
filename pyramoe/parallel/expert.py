"""Expert parallelism: each rank of an expert-parallel group holds E/ep experts of a layer, and
tokens travel to them and back by all-to-all.

Legend: T tokens, D width, K choices, W ranks in the EP group, L experts per rank (E = W * L),
N rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pyramoe.dist import all_to_all, exchange_counts
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
class _Exchange:
    """What combine needs to undo a dispatch."""

    to_expert_major_N: torch.Tensor  # received row i of the expert-major buffer is row [i] as received
    sent_splits: list[int]  # rows sent to each rank
    received_splits: list[int]  # rows received from each rank


class AllToAllDispatcher:
    """Routes on this rank's tokens, sends each kept assignment to the rank holding its expert, and
    brings the outputs back.

    The plan is compact and sorted by global expert id, so the rows for rank q are one contiguous
    run (experts q*L .. q*L+L-1). Counts are exchanged first: each rank then knows how many rows it
    receives per (source rank, local expert) and regroups them expert-major for its experts. No
    capacity agreement is needed: each source caps its own assignments, as DeepSpeed's gate does
    on its local tokens, and dropless needs nothing more than the counts.
    """

    def __init__(self, group: dist.ProcessGroup | None, ep_size: int, num_local_experts: int):
        self.group = group
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts

    def plan(self, routing: Routing, num_experts: int) -> DispatchPlan:
        if num_experts != self.ep_size * self.num_local_experts:
            raise ValueError(f"experts: {num_experts} experts != {self.ep_size} ranks x {self.num_local_experts}")
        return plan_dispatch(routing, num_experts, padded_waste_limit=0.0)

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> ExpertBatch:
        rows_ND = move_rows(expand_top_k(x_TD, plan.top_k), plan.assignment_N, None, plan.num_rows)
        send_counts_WL = plan.tokens_per_expert_E.view(self.ep_size, self.num_local_experts)
        recv_counts_WL = exchange_counts(send_counts_WL, self.group)
        sent, received = send_counts_WL.sum(1).tolist(), recv_counts_WL.sum(1).tolist()
        received_ND = all_to_all(rows_ND, received, sent, self.group)
        order_N = source_major_to_expert_major(recv_counts_WL)
        local_ND = move_rows(received_ND, order_N, None, order_N.numel())
        handle = _Exchange(order_N, sent, received)
        return ExpertBatch(local_ND, recv_counts_WL.sum(0), None, handle)

    def combine(self, y_rows: torch.Tensor, batch: ExpertBatch, plan: DispatchPlan) -> torch.Tensor:
        exchange: _Exchange = batch.handle
        by_source_ND = move_rows(y_rows, None, exchange.to_expert_major_N, y_rows.shape[0])
        back_ND = all_to_all(by_source_ND, exchange.sent_splits, exchange.received_splits, self.group)
        y_AD = move_rows(back_ND, None, plan.assignment_N, plan.num_tokens * plan.top_k)
        return weighted_sum_over_choices(y_AD, plan)


def source_major_to_expert_major(counts_WL: torch.Tensor) -> torch.Tensor:
    """Row indices that reorder a buffer laid out [source rank][local expert] into
    [local expert][source rank] (each run of counts_WL[w, l] rows kept in order)."""
    flat = counts_WL.reshape(-1)
    starts_WL = (torch.cumsum(flat, 0) - flat).view_as(counts_WL)
    runs_LW = counts_WL.t().reshape(-1)
    run_starts_LW = starts_WL.t().reshape(-1)
    total = int(runs_LW.sum())
    first_of_run = torch.repeat_interleave(torch.cumsum(runs_LW, 0) - runs_LW, runs_LW)
    within = torch.arange(total, device=counts_WL.device) - first_of_run
    return torch.repeat_interleave(run_starts_LW, runs_LW) + within
