"""AdamW with expert / non-expert parameter groups, and the warmup + cosine learning-rate schedule
(`LRPlan`: its exact ends, and what resuming with other settings does).

Expert weights live in their own groups (DeepSpeed-MoE does the same) because, once experts are
sharded across processes, their gradients are reduced over a different group than the dense ones;
here it also lets the expert LR be scaled on its own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

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
            name = ("expert" if expert else "dense") + ("" if decay else "_no_decay")
            groups.append({"params": params, "name": name, "moe": expert, **group_settings(name, config)})
    return groups


def group_settings(name: str, config: TrainConfig) -> dict:
    """The hyper-parameters of parameter group `name` (expert|dense, [_no_decay]) under `config`."""
    return {
        "weight_decay": 0.0 if name.endswith("_no_decay") else config.weight_decay,
        "lr_scale": config.expert_lr_scale if name.startswith("expert") else 1.0,
        "betas": (config.beta1, config.beta2),
    }


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, config), lr=config.lr, betas=(config.beta1, config.beta2))


def apply_settings(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """Set `config`'s hyper-parameters on every group. Loading an optimizer's state also loads the
    hyper-parameters it was saved with; a resumed run with new train.* settings must use the new ones."""
    for group in optimizer.param_groups:
        group.update(group_settings(group["name"], config))


@dataclass(frozen=True)
class LRPlan:
    """The learning-rate schedule of a run, over optimizer steps 0..steps-1.

    A fresh plan (start_lr None): linear warmup, lr*(s+1)/warmup for s < warmup, so the peak `lr` is
    reached exactly on step warmup-1 (step 0 when warmup is 0) and used once; then a cosine from `lr`
    that reaches exactly `min_lr` on the last step, steps-1. If warmup >= steps the run ends inside
    its warmup. Steps past the end (an extended run, or a caller running over) stay at min_lr.

    A re-planned schedule (see `resume_plan`) starts at step `start` with `start_lr` and follows a
    cosine from there to `min_lr` on the last step.
    """

    lr: float
    min_lr: float
    warmup: int
    steps: int
    start: int = 0
    start_lr: float | None = None

    @classmethod
    def fresh(cls, config: TrainConfig) -> LRPlan:
        return cls(lr=config.lr, min_lr=config.min_lr, warmup=config.warmup, steps=config.steps)

    @classmethod
    def from_dict(cls, data: dict) -> LRPlan:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def peak_step(self) -> int:
        """The step that uses the peak LR (the last warmup step)."""
        return max(self.warmup, 1) - 1

    def lr_at(self, step: int) -> float:
        if self.start_lr is None:
            if step <= self.peak_step:
                return self.lr * (step + 1) / max(self.warmup, 1)
            start, start_lr = self.peak_step, self.lr
        else:
            start, start_lr = self.start, self.start_lr
        last = self.steps - 1
        if step >= last:
            return self.min_lr  # exactly, not up to cosine rounding
        if step <= start:
            return start_lr
        progress = (step - start) / (last - start)
        return self.min_lr + 0.5 * (start_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, schedule: TrainConfig | LRPlan) -> float:
    """LR of optimizer step `step` (0-based) under `schedule` (a TrainConfig means its fresh plan)."""
    plan = schedule if isinstance(schedule, LRPlan) else LRPlan.fresh(schedule)
    return plan.lr_at(step)


# Settings that shape the schedule; changing one on resume re-plans what is left of it.
_SCHEDULE_FIELDS = ("lr", "min_lr", "warmup", "steps")


def resume_plan(saved: LRPlan, config: TrainConfig, step: int) -> LRPlan:
    """The schedule for resuming at `step` (the next step to run) with `config`.

    Unchanged settings keep the saved plan, so a resumed run repeats an uninterrupted one exactly.
    Otherwise the rate never jumps: during warmup the run simply follows a fresh plan of the new
    settings (same ramp, a longer or shorter cosine); after warmup the rest of the run is a cosine from
    the rate step `step` would have had to the new min_lr on the new last step. So extending a
    finished run (`--resume --steps N`) continues at min_lr. Changing lr or warmup after warmup is
    refused: the peak is behind, and the new value would be silently ignored.
    """
    if all(getattr(saved, name) == getattr(config, name) for name in _SCHEDULE_FIELDS):
        return saved
    if saved.start_lr is None and step <= saved.peak_step:
        return LRPlan.fresh(config)
    for name in ("lr", "warmup"):
        if getattr(saved, name) != getattr(config, name):
            raise ValueError(
                f"train.{name}: cannot change when resuming after warmup (the run is at step {step}, "
                f"its rate follows {name}={getattr(saved, name)!r}); lower train.min_lr or start a new run"
            )
    return LRPlan(lr=config.lr, min_lr=config.min_lr, warmup=config.warmup, steps=config.steps,
                  start=step, start_lr=saved.lr_at(step))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule is a pure function of the step, so nothing but the step needs checkpointing."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
