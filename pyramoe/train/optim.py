"""AdamW with expert / non-expert parameter groups, and the warmup + cosine learning-rate schedule.

Expert weights live in their own groups (DeepSpeed-MoE does the same) because, once experts are
sharded across processes, their gradients are reduced over a different group than the dense ones;
here it also lets the expert LR be scaled on its own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyramoe.train.config import TrainConfig

# 1-D tensors (biases, LayerNorm gains) get no weight decay; matrices and embeddings do (GPT-2 style).
_NO_DECAY_LEAVES = ("bias", "b_in", "b_out")


def is_expert_param(name: str) -> bool:
    """GroupedExperts weights: the parameters that are sharded under expert parallelism."""
    return ".experts." in name


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Up to four groups (dense/expert x decay/no-decay); empty groups are left out.

    `named_parameters` yields a tied tensor once, so the shared embedding is optimised once.
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        decay = leaf not in _NO_DECAY_LEAVES and param.dim() >= 2
        buckets.setdefault((is_expert_param(name), decay), []).append(param)
    groups = []
    for expert in (False, True):
        for decay in (True, False):
            params = buckets.get((expert, decay))
            if not params:
                continue
            groups.append({
                "params": params,
                "name": ("expert" if expert else "dense") + ("" if decay else "_no_decay"),
                "moe": expert,
                "weight_decay": config.weight_decay if decay else 0.0,
                "lr_scale": config.expert_lr_scale if expert else 1.0,
            })
    return groups


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, config), lr=config.lr, betas=(config.beta1, config.beta2))


def lr_at(step: int, config: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to lr, cosine decay to min_lr at the end."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule is a pure function of the step, so nothing but the step needs checkpointing."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
