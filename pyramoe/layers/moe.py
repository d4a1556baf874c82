"""The MoE layer: router -> dispatch -> grouped experts -> combine (+ Residual-MoE, + shared expert).

Legend: T tokens, D width, E experts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pyramoe.config import MoEConfig
from pyramoe.layers.dispatch import Dispatcher, LocalDispatcher, combine_weights
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.gating import Router, Routing
from pyramoe.layers.mlp import MLP

# Inference with at most this many (token, choice) assignments (a decode step of up to 32 sequences
# at top-2) runs the experts straight from the router's choices: grouping a handful of rows in
# Python costs less than the sort/scatter dispatch, whose dozens of small ops dominate a decode step
# (on CUDA too: H100, bench model, 53 -> 73 tok/s at batch 1, 968 -> 1,032 at 16). Same experts and
# weights; the result differs only in summation order (tests/test_decode_path.py).
FEW_ASSIGNMENTS = 64


class TokenSplit(Protocol):
    """Which of the layer's tokens this process routes, and how the outputs come back together."""

    aux_scale: float

    def splits(self, num_tokens: int) -> bool: ...

    def split(self, x_TD: torch.Tensor) -> torch.Tensor: ...

    def gather(self, y_local: torch.Tensor, num_tokens: int) -> torch.Tensor: ...


@dataclass
class MoEStats:
    """Per-layer routing statistics and aux losses, returned by every MoE forward."""

    balance_loss: torch.Tensor  # over the tokens this process routed: their true value
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # kept assignments per expert (int64, detached)
    routed_per_expert: torch.Tensor  # assignments per expert before capacity drops
    dropped_fraction: torch.Tensor  # fraction of (token, choice) assignments dropped
    capacity: int | None
    # Weight of these aux losses in this process's objective: 1/TP when the layer's tokens are split
    # over a TP group whose gradients are then summed (so the sum is the mean over the shares).
    aux_weight: float = 1.0
    # These statistics cover this process's share of the layer's tokens (split over a TP group):
    # the layer's counts are the sum over the group.
    token_share: bool = False


class MoELayer(nn.Module):
    def __init__(
        self, d_model: int, d_ff: int, config: MoEConfig, activation: str = "gelu", bias: bool = True
    ):
        super().__init__()
        config.validate()
        self.config = config
        expert_d_ff = config.expert_d_ff or d_ff
        self.router = Router(d_model, config)
        self.experts = GroupedExperts(config.num_experts, d_model, expert_d_ff, activation, bias)
        self.dispatcher: Dispatcher = LocalDispatcher()
        # Tensor parallelism gives each TP rank a share of the tokens (`pyramoe.parallel.tensor`);
        # None on a single device.
        self.token_split: TokenSplit | None = None
        self.residual_mlp = MLP(d_model, d_ff, activation, bias) if config.use_residual else None
        # Residual-MoE (DeepSpeed's use_residual): a per-token softmax mix of the MLP and the expert.
        self.coefficient = nn.Linear(d_model, 2) if config.use_residual else None
        # Shared expert (DeepSeek, Qwen2-MoE): a dense MLP added to the routed output, optionally sigmoid-gated.
        self.shared_expert = MLP(d_model, config.shared_d_ff, activation, bias) if config.shared_d_ff else None
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if config.shared_gate else None

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEStats]:
        """`token_mask` (bool, x's shape without the last dimension): only the True tokens are routed;
        the others (padding) get output 0 and count in no statistic."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        if token_mask is not None and not bool(token_mask.all()) and bool(token_mask.any()):
            real_N = token_mask.reshape(-1).nonzero().squeeze(1)
            y_ND, stats = self._route_and_mix(x_TD.index_select(0, real_N), generator)
            y_TD = torch.zeros_like(x_TD).index_copy(0, real_N, y_ND.to(x_TD.dtype))
            return y_TD.view(shape), stats
        y_TD, stats = self._route_and_mix(x_TD, generator)
        return y_TD.view(shape), stats

    def _route_and_mix(
        self, x_TD: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, MoEStats]:
        num_tokens = x_TD.shape[0]
        split = self.token_split is not None and self.token_split.splits(num_tokens)
        if split:
            x_TD = self.token_split.split(x_TD)
        if x_TD.shape[0] == 0:
            raise ValueError(f"MoELayer: got an empty batch (0 of {num_tokens} tokens on this rank)")
        routing = self.router(x_TD, generator=generator)
        if self._few_assignments(routing):
            y_TD = self._mix_few(x_TD, routing)
            tokens_E = routed_E = torch.bincount(routing.expert_idx_TK.reshape(-1), minlength=self.num_experts)
            dropped = routing.z_loss.new_zeros(())
        else:
            plan = self.dispatcher.plan(routing, self.num_experts)
            batch = self.dispatcher.dispatch(x_TD, plan)
            expert_out = self.experts(batch.rows, batch.tokens_per_expert, batch.rows_per_expert, batch.host_counts)
            y_TD = self.dispatcher.combine(expert_out, batch, plan)
            tokens_E, routed_E, dropped = plan.tokens_per_expert_E, plan.routed_per_expert_E, plan.dropped_fraction
        if self.residual_mlp is not None:
            coef_T2 = torch.softmax(self.coefficient(x_TD), dim=-1)
            y_TD = y_TD * coef_T2[:, :1] + self.residual_mlp(x_TD) * coef_T2[:, 1:]
        if self.shared_expert is not None:
            y_TD = y_TD + self._shared(x_TD)
        aux_weight = 1.0
        if split:
            y_TD = self.token_split.gather(y_TD, num_tokens)
            aux_weight = self.token_split.aux_scale
        if torch.is_grad_enabled():  # (statistics must not keep the graph alive)
            tokens_E, routed_E, dropped = tokens_E.detach(), routed_E.detach(), dropped.detach()
        stats = MoEStats(
            routing.balance_loss, routing.z_loss, tokens_E, routed_E, dropped, routing.capacity, aux_weight, split
        )
        return y_TD, stats

    def _few_assignments(self, routing: Routing) -> bool:
        """Dropless inference on one process with few assignments: `_mix_few` applies."""
        return (
            routing.capacity is None
            and not self.training
            and not torch.is_grad_enabled()
            and routing.expert_idx_TK.numel() <= FEW_ASSIGNMENTS
            and type(self.dispatcher) is LocalDispatcher
            and type(self.experts) is GroupedExperts
        )

    def _mix_few(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Each chosen expert runs once on its tokens (grouped in Python from the router's choices),
        and its weighted output is added into theirs: a decode step in a few ops per expert."""
        experts = self.experts
        top_k = routing.expert_idx_TK.shape[1]
        weight_A = combine_weights(routing, None).reshape(-1).to(x_TD.dtype)
        expert_A = routing.expert_idx_TK.reshape(-1).tolist()
        if x_TD.shape[0] == 1:
            y_TD = None
            for a, e in sorted(enumerate(expert_A), key=lambda pair: pair[1]):
                y_choice = experts.expert_forward(e, x_TD) * weight_A[a]
                y_TD = y_choice if y_TD is None else y_TD.add_(y_choice)
            return y_TD
        order = sorted(range(len(expert_A)), key=expert_A.__getitem__)  # stable: by expert, then assignment
        token_R = torch.tensor([a // top_k for a in order], device=x_TD.device)
        x_RD = x_TD.index_select(0, token_R)
        y_parts, start = [], 0
        for e, group in itertools.groupby(expert_A[a] for a in order):
            rows = len(list(group))
            y_parts.append(experts.expert_forward(e, x_RD[start : start + rows]))
            start += rows
        y_RD = torch.cat(y_parts) * weight_A.index_select(0, torch.tensor(order, device=x_TD.device)).unsqueeze(1)
        return torch.zeros_like(x_TD).index_add_(0, token_R, y_RD)

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        shared_TD = self.shared_expert(x_TD)
        if self.shared_expert_gate is None:
            return shared_TD
        return torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
