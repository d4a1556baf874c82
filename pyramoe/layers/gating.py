"""Router (gating): scores tokens against experts and picks the top-k.

Legend: T tokens, D model width, E experts, K experts chosen per token.
The router runs in fp32 with autocast disabled, whatever the model dtype (as DeepSpeed does): bf16
logits make routing decisions noisy and the balance loss imprecise. Which conventions it follows
(noise, drop order, gate normalisation, balance loss) is `MoEConfig.router_rules()`.
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
    # Both aux losses are 0 in eval mode under torch.no_grad (inference), where nothing reads them.
    balance_loss: torch.Tensor  # Switch/GShard load-balancing loss (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # ST-MoE router z-loss: mean(logsumexp(logits)^2)
    capacity: int | None  # None: dropless
    # Divide each token's kept weights by their sum once capacity drops are known (gate_norm="after_drop").
    normalize_after_drop: bool = False
    scale: float = 1.0  # combine weights are multiplied by it after normalisation (routed_scaling)


class Router(nn.Module):
    """Linear gate + fp32 softmax (or sigmoid) + top-k, with optional noise, capacity, aux losses and
    DeepSeek-V3's bias-corrected, group-limited selection."""

    def __init__(self, d_model: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.rules = config.router_rules()
        self.weight = nn.Parameter(torch.empty(config.num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        if config.score_correction_bias:
            # Chooses experts, never weights them, and gets no gradient (DeepSeek-V3 adjusts it outside autograd).
            self.register_buffer("score_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    @torch.no_grad()
    def nudge_score_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): after a step, raise the selection bias of experts
        that got fewer assignments than the mean by `rate` and lower the others', no gradient."""
        if not self.config.score_correction_bias:
            raise ValueError("train.router_bias_rate: needs model.moe.score_correction_bias=true (a bias to move)")
        load_E = load_E.to(self.score_bias.device, torch.float32)
        self.score_bias += rate * torch.sign(load_E.mean() - load_E)

    def capacity(self, num_tokens: int) -> int | None:
        cfg = self.config
        if cfg.dropless:
            return None
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        return expert_capacity(num_tokens, cfg.num_experts, cfg.top_k, factor, cfg.min_capacity)

    def forward(self, x_TD: torch.Tensor, generator: torch.Generator | None = None) -> Routing:
        # Under autocast F.linear would run in bf16 even on fp32 inputs.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self._route(x_TD.to(torch.promote_types(x_TD.dtype, torch.float32)), generator)

    def _route(self, x_TD: torch.Tensor, generator: torch.Generator | None) -> Routing:
        cfg, rules = self.config, self.rules
        noise = rules.noisy_gate_policy if self.training else "off"
        if noise == "jitter":
            # Switch-Transformer jitter: multiplicative noise on the router input.
            jitter = torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps, generator=generator)
            x_TD = x_TD * jitter
        logits_TE = F.linear(x_TD, self.weight.to(x_TD.dtype))
        if cfg.router_score == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            # The balance loss wants a distribution per token: the sigmoids normalised (DeepSeek-V3's aux loss).
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        else:
            scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
        if cfg.plain_selection:
            expert_idx_TK = select_experts(logits_TE, cfg.top_k, noise, generator)
        else:
            bias_E = self.score_bias if cfg.score_correction_bias else None
            expert_idx_TK = select_grouped(scores_TE, bias_E, cfg.top_k, cfg.expert_groups, cfg.topk_groups)
        weights_TK = scores_TE.gather(1, expert_idx_TK)
        if cfg.top_k > 1 and rules.gate_norm == "before_drop":
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights_TK.dtype).eps)

        priority_TK = None
        if rules.drop_policy == "random" and self.training:
            priority_TK = torch.rand(expert_idx_TK.shape, generator=generator, device=x_TD.device)

        if self.training or torch.is_grad_enabled():
            counted_TK = expert_idx_TK if rules.balance_loss == "all" else expert_idx_TK[:, :1]
            balance_loss, z_loss = load_balancing_loss(probs_TE, counted_TK), router_z_loss(logits_TE)
        else:  # inference: nothing will read them, and a decode step is mostly such small ops
            balance_loss = z_loss = logits_TE.new_zeros(())
        return Routing(
            expert_idx_TK=expert_idx_TK,
            weights_TK=weights_TK,
            priority_TK=priority_TK,
            balance_loss=balance_loss,
            z_loss=z_loss,
            capacity=self.capacity(x_TD.shape[0]),
            normalize_after_drop=cfg.top_k > 1 and rules.gate_norm == "after_drop",
            scale=cfg.routed_scaling,
        )


def select_experts(
    logits_TE: torch.Tensor, top_k: int, noise: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The K experts of each token, best first. Gumbel noise changes the choice, never the weights:
    "gumbel" noises every choice, "gumbel_second" keeps the first choice clean (DeepSpeed's top-2)."""
    if noise in ("gumbel", "gumbel_second"):
        uniform_TE = torch.rand(logits_TE.shape, generator=generator, device=logits_TE.device)
        noisy_TE = logits_TE - torch.log(-torch.log(uniform_TE.clamp_min(1e-20)))
        if noise == "gumbel":
            logits_TE = noisy_TE
        else:
            first_T1 = logits_TE.argmax(dim=-1, keepdim=True)
            rest_TK = noisy_TE.scatter(1, first_T1, float("-inf")).topk(top_k - 1, dim=-1).indices
            return torch.cat([first_T1, rest_TK], dim=1)
    if top_k == 1:
        return logits_TE.argmax(dim=-1, keepdim=True)
    return logits_TE.topk(top_k, dim=-1).indices


def select_grouped(
    scores_TE: torch.Tensor, bias_E: torch.Tensor | None, top_k: int, groups: int, topk_groups: int
) -> torch.Tensor:
    """DeepSeek-V3 selection: top-k of scores + bias, among the experts of the `topk_groups` groups
    whose two best biased scores sum highest (groups of E / `groups` consecutive experts)."""
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.to(scores_TE.dtype)
    if groups > 1:
        num_tokens, num_experts = choice_TE.shape
        choice_TGe = choice_TE.view(num_tokens, groups, num_experts // groups)
        group_score_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
        group_idx_TG = group_score_TG.topk(topk_groups, dim=-1, sorted=False).indices
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx_TG, True)
        choice_TE = choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
    return choice_TE.topk(top_k, dim=-1).indices


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e with f_e the fraction of the given choices (all T*K, or only the first
    choices) that went to e, before drops, and P_e the mean router probability of e.
    Equals 1 when routing is uniform."""
    num_tokens, num_experts = probs_TE.shape
    counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=num_experts)
    fraction_E = counts_E.to(probs_TE.dtype) / expert_idx_TK.numel()
    return num_experts * torch.dot(fraction_E, probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
