"""Router (gating): scores tokens against experts and picks the top-k.

Legend: T tokens, D model width, E experts, K experts chosen per token.
Softmax, top-k and the auxiliary losses run in fp32 whatever the model dtype (as DeepSpeed does),
because bf16 logits make routing decisions noisy and the balance loss imprecise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyramoe.config import MoEConfig


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
    """Slots per expert: ceil(k * tokens / experts * factor), at least `min_capacity`, at most `tokens`.

    A token never picks the same expert twice, so no expert can need more than `num_tokens` slots.
    """
    capacity = math.ceil(top_k * num_tokens / num_experts * capacity_factor)
    return max(1, min(num_tokens, max(capacity, min_capacity)))


@dataclass
class Routing:
    """What the router decided for T tokens."""

    expert_idx_TK: torch.Tensor  # int64 expert ids, column 0 is each token's first choice
    weights_TK: torch.Tensor  # fp32 combine weights, differentiable w.r.t. the router
    priority_TK: torch.Tensor | None  # fp32 drop priority (lower keeps first); None: by position
    balance_loss: torch.Tensor  # Switch/GShard load-balancing loss (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # ST-MoE router z-loss: mean(logsumexp(logits)^2)
    capacity: int | None  # None: dropless


class Router(nn.Module):
    """Linear gate + fp32 softmax + top-k, with optional noise, capacity and aux losses."""

    def __init__(self, d_model: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def capacity(self, num_tokens: int) -> int | None:
        cfg = self.config
        if cfg.dropless:
            return None
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        return expert_capacity(num_tokens, cfg.num_experts, cfg.top_k, factor, cfg.min_capacity)

    def forward(self, x_TD: torch.Tensor, generator: torch.Generator | None = None) -> Routing:
        cfg = self.config
        x_TD = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))
        noisy = self.training and cfg.noisy_gate_policy is not None
        if noisy and cfg.noisy_gate_policy == "jitter":
            # Switch-Transformer jitter: multiplicative noise on the router input.
            noise = torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps, generator=generator)
            x_TD = x_TD * noise
        logits_TE = F.linear(x_TD, self.weight.to(x_TD.dtype))
        probs_TE = torch.softmax(logits_TE, dim=-1)

        select_TE = logits_TE
        if noisy and cfg.noisy_gate_policy == "gumbel":
            # Noise changes which expert is chosen, never the gradient path of the weights.
            uniform = torch.rand(logits_TE.shape, generator=generator, device=logits_TE.device)
            select_TE = logits_TE - torch.log(-torch.log(uniform.clamp_min(1e-20)))
        if cfg.top_k == 1:
            expert_idx_TK = select_TE.argmax(dim=-1, keepdim=True)
        else:
            expert_idx_TK = select_TE.topk(cfg.top_k, dim=-1).indices
        weights_TK = probs_TE.gather(1, expert_idx_TK)
        if cfg.top_k > 1 and cfg.normalize_top_k:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-9)

        priority_TK = None
        if cfg.drop_policy == "random" and self.training:
            priority_TK = torch.rand(expert_idx_TK.shape, generator=generator, device=x_TD.device)

        return Routing(
            expert_idx_TK=expert_idx_TK,
            weights_TK=weights_TK,
            priority_TK=priority_TK,
            balance_loss=load_balancing_loss(probs_TE, expert_idx_TK),
            z_loss=router_z_loss(logits_TE),
            capacity=self.capacity(x_TD.shape[0]),
        )


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e with f_e the fraction of the T*K choices that went to e (before drops)
    and P_e the mean router probability of e. Equals 1 when routing is uniform."""
    num_tokens, num_experts = probs_TE.shape
    counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=num_experts)
    fraction_E = counts_E.to(probs_TE.dtype) / expert_idx_TK.numel()
    return num_experts * torch.dot(fraction_E, probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
