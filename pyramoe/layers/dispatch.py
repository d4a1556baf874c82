"""Token -> expert dispatch and the weighted combine back.

Legend: T tokens, D width, E experts, K choices per token, N = T*K assignments, C capacity (slots
per expert), S rows per expert in a padded expert buffer.

The sparse path (the default) sorts the N assignments by expert once and moves rows with
unique-index copies (index_select / index_copy_, see `_MoveRows`): O(N*D) memory traffic.
`DenseEinsumDispatcher` is the GShard/DeepSpeed formulation with [T, E, C] one-hot tensors,
O(T*E*C*D) work: kept only as a reference for tests and benchmarks.

Combine weights (both paths): the router's, zeroed where dropped and, for gate_norm="after_drop",
renormalised over the choices the token kept (`combine_weights`).

Drop rule (both paths): within each expert, assignments are served in priority order - all first
choices before any second choice, and within one choice rank by token position (or by a random
priority for random token selection) - and those past the capacity are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from pyramoe.layers.gating import Routing

# A padded [E, C, D] buffer runs the experts as one batched GEMM; it is used while padding wastes
# at most this fraction of extra rows, beyond which per-expert GEMMs over compact slices win.
PADDED_WASTE_LIMIT = 1.25


@dataclass
class DispatchPlan:
    """Where each kept assignment goes. Kept assignments are grouped by expert, in priority order.

    An assignment id is a = token * K + choice, the row of that (token, choice) pair in a [T*K, D]
    view of the tokens; a row of the expert buffer is a slot.
    """

    assignment_N: torch.Tensor  # int64 assignment id of each kept assignment, in expert order
    slot_N: torch.Tensor | None  # its row in the padded expert buffer; None: compact (row i = i)
    weight_TK: torch.Tensor  # fp32 combine weights, 0 where dropped (router-differentiable)
    tokens_per_expert_E: torch.Tensor  # int64 kept assignments per expert
    routed_per_expert_E: torch.Tensor  # int64 assignments per expert before dropping
    kept_TK: torch.Tensor  # bool, which (token, choice) pairs survived the capacity
    rows_per_expert: int | None  # S of the padded layout; None: compact layout

    @property
    def num_tokens(self) -> int:
        return self.kept_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.kept_TK.shape[1]

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert_E.numel()

    @property
    def num_rows(self) -> int:
        """Rows of the expert buffer."""
        if self.rows_per_expert is None:
            return self.assignment_N.numel()
        return self.num_experts * self.rows_per_expert

    @property
    def token_idx_N(self) -> torch.Tensor:
        return self.assignment_N // self.top_k

    @property
    def dropped_fraction(self) -> torch.Tensor:
        return 1.0 - self.kept_TK.float().mean()


def combine_weights(routing: Routing, kept_TK: torch.Tensor | None) -> torch.Tensor:
    """Router weights with dropped choices zeroed and, for gate_norm="after_drop", renormalised over
    the choices each token kept (both dropped: all zero); then times the routed scaling factor."""
    weight_TK = routing.weights_TK if kept_TK is None else routing.weights_TK * kept_TK
    if routing.normalize_after_drop:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weight_TK.dtype).eps)
    if routing.scale != 1.0:
        weight_TK = weight_TK * routing.scale
    return weight_TK


def _priority_rank_TK(priority_TK: torch.Tensor) -> torch.Tensor:
    """Rank of each token within its choice column (0 = served first)."""
    return priority_TK.argsort(dim=0).argsort(dim=0)


def plan_dispatch(
    routing: Routing, num_experts: int, padded_waste_limit: float = PADDED_WASTE_LIMIT
) -> DispatchPlan:
    expert_idx_TK = routing.expert_idx_TK
    num_tokens, top_k = expert_idx_TK.shape
    n = num_tokens * top_k
    device = expert_idx_TK.device
    # Sorting in k-major order puts every first choice ahead of every second choice.
    expert_N = expert_idx_TK.t().reshape(-1)
    if routing.priority_TK is None:
        order_N = torch.sort(expert_N, stable=True).indices
    else:
        rank_TK = _priority_rank_TK(routing.priority_TK) + torch.arange(top_k, device=device) * num_tokens
        order_N = (expert_N * n + rank_TK.t().reshape(-1)).argsort()
    routed_E = torch.bincount(expert_N, minlength=num_experts)
    starts_E = torch.cumsum(routed_E, 0) - routed_E
    expert_sorted_N = expert_N[order_N]
    position_sorted_N = torch.arange(n, device=device) - starts_E[expert_sorted_N]

    capacity = routing.capacity
    if capacity is None:
        kept_E = routed_E
        kept_TK = torch.ones_like(expert_idx_TK, dtype=torch.bool)
        rows = None  # the largest expert's rows: read (a host sync) only if a padded layout may be chosen
    else:
        keep_sorted_N = position_sorted_N < capacity
        kept_KT = torch.empty(n, dtype=torch.bool, device=device)
        kept_KT[order_N] = keep_sorted_N
        kept_TK = kept_KT.view(top_k, num_tokens).t()
        order_N = order_N[keep_sorted_N]
        expert_sorted_N = expert_sorted_N[keep_sorted_N]
        position_sorted_N = position_sorted_N[keep_sorted_N]
        kept_E = routed_E.clamp(max=capacity)
        rows = capacity

    slot_N = None
    rows_per_expert = None
    if num_experts > 1 and padded_waste_limit > 0 and rows is None:
        rows = int(routed_E.max())
    if num_experts > 1 and rows is not None and num_experts * rows <= padded_waste_limit * n:
        rows_per_expert = rows
        slot_N = expert_sorted_N * rows + position_sorted_N
    return DispatchPlan(
        assignment_N=(order_N % num_tokens) * top_k + order_N // num_tokens,
        slot_N=slot_N,
        weight_TK=combine_weights(routing, None if capacity is None else kept_TK),
        tokens_per_expert_E=kept_E,
        routed_per_expert_E=routed_E,
        kept_TK=kept_TK,
        rows_per_expert=rows_per_expert,
    )


class _MoveRows(torch.autograd.Function):
    """out = zeros(num_rows, D); out[dst] = x[src] for unique src and dst (None: 0..n-1).

    Unique indices make the backward another gather/copy instead of index_add, whose atomic-free
    CPU kernel is ~5x slower than a copy.
    """

    @staticmethod
    def forward(ctx, x, src, dst, num_rows):  # noqa: ANN001, ANN205
        rows = x if src is None else x.index_select(0, src)
        out = rows if dst is None else rows.new_zeros(num_rows, x.shape[1]).index_copy_(0, dst, rows)
        ctx.save_for_backward(src, dst)
        ctx.num_src_rows = x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        src, dst = ctx.saved_tensors
        rows = grad_out if dst is None else grad_out.index_select(0, dst)
        if src is not None:
            rows = rows.new_zeros(ctx.num_src_rows, rows.shape[1]).index_copy_(0, src, rows)
        return rows, None, None, None


def move_rows(x: torch.Tensor, src: torch.Tensor | None, dst: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    return _MoveRows.apply(x, src, dst, num_rows)


@dataclass
class ExpertBatch:
    """Rows for the experts this process holds, in their layout, plus what `combine` needs to send
    the results back (a dispatcher's own state, e.g. all-to-all splits)."""

    rows: torch.Tensor  # [E_local * S, D] padded or [N_local, D] compact, grouped by local expert
    tokens_per_expert: torch.Tensor  # int64 [E_local] rows that hold tokens, per local expert
    rows_per_expert: int | None  # S of the padded layout; None: compact
    handle: object = None
    host_counts: list[int] | None = None  # tokens_per_expert as a list, when the dispatcher read it anyway


class Dispatcher(Protocol):
    """Moves tokens to the experts that hold them and back: router plan -> `ExpertBatch` for the
    local expert shard -> expert outputs -> weighted combine in token order. `LocalDispatcher`
    (every expert in this process) is the single-device one; `pyramoe.parallel` adds all-to-all ones."""

    def plan(self, routing: Routing, num_experts: int) -> DispatchPlan: ...

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> ExpertBatch: ...

    def combine(self, y_rows: torch.Tensor, batch: ExpertBatch, plan: DispatchPlan) -> torch.Tensor: ...


def expand_top_k(x_TD: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T*K, D] rows, row a = token * K + choice (the assignment ids of a plan)."""
    return x_TD if top_k == 1 else x_TD.repeat_interleave(top_k, dim=0)


def weighted_sum_over_choices(y_AD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """[T*K, D] expert outputs in assignment order -> [T, D] sum of each token's weighted choices."""
    y_AD = y_AD * plan.weight_TK.reshape(-1, 1).to(y_AD.dtype)
    if plan.top_k == 1:
        return y_AD
    return y_AD.view(plan.num_tokens, plan.top_k, -1).sum(dim=1)


class LocalDispatcher:
    """Single-process sparse dispatch: rows move into expert order and back by unique-index copies;
    top-k outputs are weighted and summed over the k choices of each token."""

    def plan(self, routing: Routing, num_experts: int) -> DispatchPlan:
        return plan_dispatch(routing, num_experts)

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> ExpertBatch:
        rows = move_rows(expand_top_k(x_TD, plan.top_k), plan.assignment_N, plan.slot_N, plan.num_rows)
        return ExpertBatch(rows, plan.tokens_per_expert_E, plan.rows_per_expert)

    def combine(self, y_rows: torch.Tensor, batch: ExpertBatch, plan: DispatchPlan) -> torch.Tensor:
        y_AD = move_rows(y_rows, plan.slot_N, plan.assignment_N, plan.num_tokens * plan.top_k)
        return weighted_sum_over_choices(y_AD, plan)


# -- dense one-hot reference (GShard / DeepSpeed formulation) ---------------------------------------


def dense_dispatch_tensors(
    routing: Routing, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """dispatch_TEC (0/1) and combine_TEC (weights) one-hot tensors, the capacity and kept_TK,
    built independently of `plan_dispatch` (cumsum of one-hot masks) so tests can compare the two."""
    expert_idx_TK = routing.expert_idx_TK
    num_tokens, top_k = expert_idx_TK.shape
    capacity = routing.capacity if routing.capacity is not None else num_tokens
    mask_KTE = F.one_hot(expert_idx_TK.t(), num_experts).to(torch.float32)
    if routing.priority_TK is not None:
        order_KT = routing.priority_TK.t().argsort(dim=1)
        mask_KTE = mask_KTE.gather(1, order_KT.unsqueeze(-1).expand_as(mask_KTE))
    # Location of each assignment in its expert's queue: count of earlier (k, t) with that expert.
    locations_KTE = (torch.cumsum(mask_KTE.reshape(-1, num_experts), 0).view_as(mask_KTE) - 1) * mask_KTE
    if routing.priority_TK is not None:
        inverse_KT = order_KT.argsort(dim=1)
        locations_KTE = locations_KTE.gather(1, inverse_KT.unsqueeze(-1).expand_as(locations_KTE))
        mask_KTE = mask_KTE.gather(1, inverse_KT.unsqueeze(-1).expand_as(mask_KTE))
    mask_KTE = mask_KTE * (locations_KTE < capacity)
    location_KT = locations_KTE.sum(dim=-1).long()
    slot_KTC = F.one_hot(location_KT.clamp(max=capacity - 1), capacity).to(torch.float32)
    dispatch_KTEC = mask_KTE.unsqueeze(-1) * slot_KTC.unsqueeze(2)
    kept_TK = mask_KTE.sum(dim=-1).t() > 0
    weights_KT = combine_weights(routing, kept_TK).t()
    combine_TEC = (weights_KT[..., None, None] * dispatch_KTEC).sum(dim=0)
    return dispatch_KTEC.sum(dim=0), combine_TEC, capacity, kept_TK


class DenseEinsumDispatcher:
    """Reference only: einsum with [T, E, C] one-hot tensors, the formulation DeepSpeed-MoE replaces."""

    def __init__(self, routing: Routing, num_experts: int):
        tensors = dense_dispatch_tensors(routing, num_experts)
        self.dispatch_TEC, self.combine_TEC, self.capacity, self.kept_TK = tensors

    def dispatch(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_ECD = torch.einsum("tec,td->ecd", self.dispatch_TEC.to(x_TD.dtype), x_TD)
        return x_ECD.reshape(-1, x_TD.shape[1])

    def combine(self, y_rows: torch.Tensor) -> torch.Tensor:
        num_experts = self.combine_TEC.shape[1]
        y_ECD = y_rows.view(num_experts, self.capacity, -1)
        return torch.einsum("tec,ecd->td", self.combine_TEC.to(y_rows.dtype), y_ECD)
