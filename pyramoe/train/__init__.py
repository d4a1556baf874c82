"""Training: config, AdamW with expert groups, the loop, checkpoints, evaluation, sampling, plots, and
Mixture-of-Students distillation.

The names below are loaded on first use (PEP 562), so that importing one submodule (e.g.
`pyramoe.train.optim` or `pyramoe.train.config`) does not drag in the tokenizer, tqdm and the
distiller. Submodules import each other by their full module names, never through this package.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "Checkpoint": "checkpoint",
    "build_model": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "RunConfig": "config",
    "TrainConfig": "config",
    "build_model_config": "config",
    "run_config_from_dict": "config",
    "DistillTrainer": "distill",
    "create_distill_trainer": "distill",
    "resolve_distill_run": "distill",
    "EvalResult": "evaluate",
    "evaluate": "evaluate",
    "DistillConfig": "kd",
    "kd_loss": "kd",
    "kd_weight_at": "kd",
    "create_trainer": "session",
    "resolve_run": "session",
    "FitResult": "trainer",
    "Trainer": "trainer",
    "train_step": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`evaluate` names both a submodule and the function it exports. Importing a submodule sets it as
    an attribute of its package, which would make `from pyramoe.train import evaluate` the module;
    keep the exported function there instead (what the eager imports used to leave)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if _EXPORTS.get(name) == name and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

