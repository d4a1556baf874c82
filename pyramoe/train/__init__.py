"""Training: config, AdamW with expert groups, the loop, checkpoints, evaluation, sampling, plots, and
Mixture-of-Students distillation."""

from pyramoe.train.checkpoint import Checkpoint, build_model, latest_checkpoint, load_checkpoint
from pyramoe.train.config import RunConfig, TrainConfig, build_model_config, run_config_from_dict
from pyramoe.train.distill import DistillTrainer, create_distill_trainer, resolve_distill_run
from pyramoe.train.evaluate import EvalResult, evaluate
from pyramoe.train.generate import complete, generate_ids
from pyramoe.train.kd import DistillConfig, kd_loss, kd_weight_at
from pyramoe.train.session import create_trainer, resolve_run
from pyramoe.train.trainer import FitResult, Trainer, train_step

__all__ = [
    "Checkpoint",
    "DistillConfig",
    "DistillTrainer",
    "EvalResult",
    "FitResult",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "build_model",
    "build_model_config",
    "complete",
    "create_distill_trainer",
    "create_trainer",
    "evaluate",
    "generate_ids",
    "kd_loss",
    "kd_weight_at",
    "latest_checkpoint",
    "load_checkpoint",
    "resolve_distill_run",
    "resolve_run",
    "run_config_from_dict",
    "train_step",
]
