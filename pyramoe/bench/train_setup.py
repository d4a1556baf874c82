"""What the training benchmarks share (`train_step`, and `scaling`, which `train_step` runs for
--nproc > 1): a model and optimizer set up as `pyramoe train` has them, and seeded batches."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from pyramoe.config import ModelConfig
from pyramoe.models import GPT
from pyramoe.presets import get_preset
from pyramoe.train.config import TrainConfig
from pyramoe.train.optim import make_optimizer, set_lr


def build(name: str, args: argparse.Namespace) -> dict[str, Any]:
    config = get_preset(name)
    config.vocab_size = args.vocab_size
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len: {args.seq_len} exceeds {name}'s max_seq_len={config.max_seq_len}")
    return build_setup(config)


def build_setup(config: ModelConfig) -> dict[str, Any]:
    """A model and its optimizer, ready to time `pyramoe train`'s step on."""
    torch.manual_seed(0)
    model = GPT(config).train()
    optimizer = make_optimizer(model, TrainConfig())
    set_lr(optimizer, 1e-4)  # small: the weights barely move, so every timed step routes alike
    return {"model": model, "optimizer": optimizer, "times": []}


def random_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()
