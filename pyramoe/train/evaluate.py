"""Validation loss, perplexity and per-layer expert load over fixed validation batches, in one
process or split over the data-parallel ranks of a distributed run (`RankShare`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
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


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device when asked; weights and optimizer state stay fp32."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class RankShare:
    """This rank's place when a distributed run evaluates: data-parallel rank `dp_index` of `dp`
    takes its share of the rows of every global batch; the results are summed over all ranks on
    `device` (the collectives' device)."""

    dp_index: int
    dp: int
    # The TP ranks of one data-parallel index compute the same logits: the loss counts on the
    # first of them alone (each token once).
    counts_loss: bool
    device: torch.device

    def rows(self, num_rows: int) -> tuple[int, int]:
        """[start, stop) of this rank's rows of a batch of `num_rows`: as even as they go."""
        start = self.dp_index * num_rows // self.dp
        return start, (self.dp_index + 1) * num_rows // self.dp


@torch.no_grad()
def evaluate(
    model: GPT, dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int, precision: str = "fp32",
    share: RankShare | None = None,
) -> EvalResult:
    """Token-weighted mean cross-entropy over the first `max_batches` validation batches (eval mode,
    so MoE layers use their eval capacity factor). With `share`, every rank (of a distributed run,
    all of them calling this) evaluates its share of each batch and the sums are all-reduced: the
    result is the one-process result on every rank."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch_sums: list[torch.Tensor] = []  # per batch, float64 on the device: no host sync per batch
    batch_tokens: list[int] = []
    load_sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (routed, kept), on the device
    try:
        for x, y in dataset.iter_eval_batches(batch_size, seq_len, max_batches):
            # Every rank reads the whole global batch, so the token counts need no reduction.
            batch_tokens.append(y.numel())
            has_rows = True
            if share is not None:
                x, y, has_rows = _rows_of_rank(x, y, share)
            x, y = x.to(device), y.to(device)
            with autocast(precision, device.type):
                out = model(x)
            logits = out.logits.float()
            loss_sum = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), reduction="sum").double()
            counts_loss = has_rows and (share is None or share.counts_loss)
            batch_sums.append(loss_sum if counts_loss else torch.zeros_like(loss_sum))
            _add_load(load_sums, out.moe_stats, counts_loss, has_rows)
    finally:
        model.train(was_training)
    return _result(batch_sums, batch_tokens, load_sums, share, device)


def _rows_of_rank(x: torch.Tensor, y: torch.Tensor, share: RankShare) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """This rank's rows of a global batch, and whether it has any. A rank left without rows (a
    short last batch) still runs the forward, whose expert-parallel layers need every rank: on the
    first row, weighted zero, its routing counted nowhere."""
    start, stop = share.rows(x.shape[0])
    if stop > start:
        return x[start:stop], y[start:stop], True
    return x[:1], y[:1], False


def _add_load(
    load_sums: dict[int, tuple[torch.Tensor, torch.Tensor]], moe_stats: dict[int, MoEStats], counts_whole: bool,
    counts_share: bool,
) -> None:
    """Add a forward's routing counts: a layer that routed all of the rank's tokens when
    `counts_whole` (under TP, every TP rank routed the same ones: the first counts), a layer that
    routed this rank's share of them (split over the TP group) when `counts_share`. Zeros, not
    nothing, otherwise: every rank reduces the same layers' counts."""
    for index, stats in moe_stats.items():
        routed, kept = stats.routed_per_expert.long(), stats.tokens_per_expert.long()
        if not (counts_share if stats.token_share else counts_whole):
            routed, kept = torch.zeros_like(routed), torch.zeros_like(kept)
        if index in load_sums:
            routed, kept = routed + load_sums[index][0], kept + load_sums[index][1]
        load_sums[index] = (routed, kept)


def _result(
    batch_sums: list[torch.Tensor], batch_tokens: list[int], load_sums: dict[int, tuple[torch.Tensor, torch.Tensor]],
    share: RankShare | None, device: torch.device,
) -> EvalResult:
    """Sum the per-batch losses and the load counts over the ranks (one all-reduce each, on the
    collectives' device), then bring them to the host once."""
    losses = torch.stack(batch_sums) if batch_sums else torch.zeros(0, dtype=torch.float64, device=device)
    layers = sorted(load_sums)
    counts = [t for index in layers for t in load_sums[index]]
    if share is not None:
        losses = losses.to(share.device)
        dist.all_reduce(losses)
        # Every rank ran the same forwards, so every rank holds the same layers' counts.
        if counts:
            flat = torch.cat(counts).to(share.device)
            dist.all_reduce(flat)
            counts = list(flat.split([t.numel() for t in counts]))
    batch_totals = losses.tolist()
    tokens = sum(batch_tokens)
    load = {
        index: ExpertLoad(counts[2 * i].tolist(), counts[2 * i + 1].tolist()) for i, index in enumerate(layers)
    }
    return EvalResult(
        loss=sum(batch_totals) / max(tokens, 1), tokens=tokens, load=load,
        batch_losses=[total / n for total, n in zip(batch_totals, batch_tokens)],
    )
