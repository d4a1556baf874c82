"""Training: config, AdamW with expert groups, the loop, checkpoints, evaluation, sampling, plots."""

from pyramoe.train.checkpoint import Checkpoint, build_model, latest_checkpoint, load_checkpoint
from pyramoe.train.config import RunConfig, TrainConfig, build_model_config, run_config_from_dict
from pyramoe.train.evaluate import EvalResult, evaluate
from pyramoe.train.generate import complete, generate_ids
from pyramoe.train.session import create_trainer, resolve_run
from pyramoe.train.trainer import FitResult, Trainer, train_step

__all__ = [
    "Checkpoint",
    "EvalResult",
    "FitResult",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "build_model",
    "build_model_config",
    "complete",
    "create_trainer",
    "evaluate",
    "generate_ids",
    "latest_checkpoint",
    "load_checkpoint",
    "resolve_run",
    "run_config_from_dict",
    "train_step",
]
