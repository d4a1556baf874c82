"""Knowledge-distillation settings, the staged-KD weight schedule and the KD loss (Mixture-of-Students).

The student's objective at optimizer step s (0-based) is

    ce_weight * CE(student, labels) + w(s) * KD(student, teacher) + the student's MoE aux loss

where KD = T² · KL(softmax(teacher / T) || softmax(student / T)), summed over the vocabulary and
averaged over tokens, and w is the staged-KD schedule: the paper stops KD part-way through training
because a shallower student eventually fits the labels better than it can imitate a deeper teacher.
Kept free of the trainer so that config parsing can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

KD_SCHEDULES = ("stop", "linear_decay", "constant")
DEFAULT_KD_STOP_FRACTION = 0.75  # of train.steps, when kd_stop_step is not set


@dataclass
class DistillConfig:
    """The [distill] section of a run (`--set distill.KEY=VALUE`); saved in every checkpoint.

    kd_schedule: "stop" keeps kd_weight for the first kd_stop_step optimizer steps, then 0;
    "linear_decay" falls linearly from kd_weight at step 0 to 0 at kd_stop_step; "constant" never
    stops (kd_stop_step is ignored). Once the weight is 0 the teacher no longer runs at all.
    """

    teacher: str | None = None  # teacher checkpoint, or a run directory meaning its latest checkpoint
    student_layers: int | None = None  # depth of a student derived from the teacher; None: layer_fraction
    layer_fraction: float = 0.875  # a derived student's depth / the teacher's, rounded down
    init_from_teacher: bool = True  # copy embeddings, final LN and the kept blocks from the teacher
    ce_weight: float = 1.0
    kd_weight: float = 1.0  # alpha
    temperature: float = 1.0
    kd_schedule: str = "stop"
    kd_stop_step: int | None = None  # None: DEFAULT_KD_STOP_FRACTION of train.steps, fixed at the start

    def validate(self) -> None:
        _check(self.student_layers is None or self.student_layers >= 1, "student_layers",
               f"must be >= 1, got {self.student_layers}")
        _check(0 < self.layer_fraction <= 1, "layer_fraction", f"must be in (0, 1], got {self.layer_fraction}")
        for name in ("ce_weight", "kd_weight"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name, f"must be a finite number >= 0, got {value}")
        _check(self.ce_weight + self.kd_weight > 0, "ce_weight", "ce_weight and kd_weight cannot both be 0")
        _check(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
               f"must be > 0, got {self.temperature}")
        _check(self.kd_schedule in KD_SCHEDULES, "kd_schedule",
               f"must be one of {KD_SCHEDULES}, got {self.kd_schedule!r}")
        _check(self.kd_stop_step is None or self.kd_stop_step >= 1, "kd_stop_step",
               f"must be >= 1, got {self.kd_stop_step}")

    def with_stop_step(self, total_steps: int) -> DistillConfig:
        """kd_stop_step made explicit, so that a resumed run (even with more --steps) keeps it."""
        if self.kd_stop_step is not None or self.kd_schedule == "constant":
            return self
        return replace(self, kd_stop_step=max(1, round(DEFAULT_KD_STOP_FRACTION * total_steps)))


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"distill.{name}: {message}")


def kd_weight_at(step: int, config: DistillConfig) -> float:
    """The KD weight of optimizer step `step` (0-based, like the LR schedule): exactly 0 from
    kd_stop_step on for "stop" and "linear_decay" (an unset kd_stop_step never stops)."""
    stop = config.kd_stop_step
    if config.kd_schedule == "constant" or stop is None:
        return config.kd_weight
    if step >= stop:
        return 0.0
    if config.kd_schedule == "linear_decay":
        return config.kd_weight * (1.0 - step / stop)
    return config.kd_weight


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_teacher || p_student) of the temperature-softened distributions, in fp32.

    The KL is summed over the vocabulary and averaged over tokens (every position of every sequence:
    "batchmean" over the flattened [B*T, V]). The T² factor keeps the soft term's gradients the same
    size whatever T (Hinton et al., 2015), so kd_weight means the same at any temperature.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match the student's {tuple(student_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * temperature**2
