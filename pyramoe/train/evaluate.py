"""Validation loss, perplexity and per-layer expert load over fixed validation batches."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pyramoe.data import TokenDataset
from pyramoe.layers.moe import MoEStats
from pyramoe.models import GPT


@dataclass
class ExpertLoad:
    """Routing counts of one MoE layer, summed over batches."""

    routed: list[int]  # assignments the router sent to each expert (before capacity drops)
    kept: list[int]  # assignments each expert processed

    @property
    def drop_rate(self) -> float:
        total = sum(self.routed)
        return 1.0 - sum(self.kept) / total if total else 0.0

    def add(self, stats: MoEStats) -> None:
        self.routed = [a + b for a, b in zip(self.routed, stats.routed_per_expert.tolist())]
        self.kept = [a + b for a, b in zip(self.kept, stats.tokens_per_expert.tolist())]


@dataclass
class EvalResult:
    loss: float
    tokens: int
    load: dict[int, ExpertLoad] = field(default_factory=dict)  # block index -> counts
    # Mean loss of each validation batch, in batch order: every run on the same data sees the same
    # batches, so two runs can be compared batch by batch (pyramoe/experiments/verdicts.py).
    batch_losses: list[float] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))  # capped: an untrained model's exp(loss) can overflow

    @property
    def drop_rate(self) -> float:
        """Mean over MoE layers; 0 for a dense model."""
        return sum(x.drop_rate for x in self.load.values()) / len(self.load) if self.load else 0.0

    def to_record(self) -> dict[str, Any]:
        return {
            "val_loss": self.loss,
            "val_ppl": self.perplexity,
            "val_tokens": self.tokens,
            "drop_rate": self.drop_rate,
            "expert_load": {str(i): x.routed for i, x in self.load.items()},
            "expert_kept": {str(i): x.kept for i, x in self.load.items()},
            "layer_drop_rate": {str(i): x.drop_rate for i, x in self.load.items()},
            "val_batch_losses": self.batch_losses,
        }


def accumulate_load(load: dict[int, ExpertLoad], moe_stats: dict[int, MoEStats]) -> None:
    for index, stats in moe_stats.items():
        if index not in load:
            size = stats.routed_per_expert.numel()
            load[index] = ExpertLoad([0] * size, [0] * size)
        load[index].add(stats)


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device when asked; weights and optimizer state stay fp32."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: GPT, dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int, precision: str = "fp32"
) -> EvalResult:
    """Token-weighted mean cross-entropy over the first `max_batches` validation batches (eval mode,
    so MoE layers use their eval capacity factor)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    batch_losses: list[float] = []
    load: dict[int, ExpertLoad] = {}
    try:
        for x, y in dataset.iter_eval_batches(batch_size, seq_len, max_batches):
            x, y = x.to(device), y.to(device)
            with autocast(precision, device.type):
                out = model(x)
            logits = out.logits.float()
            # .item(): one host sync per validation batch, outside the training step
            batch_total = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), reduction="sum").item()
            total += batch_total
            tokens += y.numel()
            batch_losses.append(batch_total / y.numel())
            accumulate_load(load, out.moe_stats)
    finally:
        model.train(was_training)
    return EvalResult(loss=total / max(tokens, 1), tokens=tokens, load=load, batch_losses=batch_losses)
