"""Gradient reduction overlapped with the backward (bucketed hooks, as DDP): training steps with
gradient accumulation on EP=2 and TP=2 x EP=2 gloo ranks follow one process on the global batch,
every bucket is launched during the last micro-batch's backward, none during the earlier ones,
and with the overlap off every bucket waits for the end of the backward."""

from __future__ import annotations

import pytest
import torch
from distributed import run_workers

from pyramoe.comm import Topology
from pyramoe.config import ModelConfig, build_layers
from pyramoe.models import GPT
from pyramoe.parallel import parallelize
from pyramoe.train.trainer import train_step

VOCAB = 97
STEPS = 3
MICRO = 2  # micro-batches per step
ROWS = 2  # rows per data-parallel rank and micro-batch


def build() -> GPT:
    torch.manual_seed(0)
    # Dropless and no aux loss: then a step on DP x 2 rows split over ranks is the one-process step.
    model = GPT(ModelConfig(
        vocab_size=VOCAB, max_seq_len=32, d_model=32, n_heads=4, aux_loss_coef=0.0, z_loss_coef=0.0,
        layers=build_layers(4, "every_other", 4, top_k=2, dropless=True, use_residual=True),
    ))
    return model


def optimizer_of(model: GPT) -> torch.optim.Optimizer:
    """After `parallelize` (which swaps in the expert shards). SGD: Adam's first steps move every
    weight by about lr whatever its gradient's size, so rounding-level differences in tiny
    gradients would show in the losses."""
    return torch.optim.SGD(model.parameters(), lr=0.5)


def global_micro_batch(step: int, micro: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batches every step: the loss falls when the steps update every weight."""
    idx = torch.randint(0, VOCAB, (dp * ROWS, 13), generator=torch.Generator().manual_seed(micro))
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def _worker(rank: int, world: int, tp: int, ep: int, overlap: bool, out_dir: str) -> None:
    topology = Topology(world, rank, tp=tp)
    model = build()
    state = parallelize(model, topology, ep=ep)
    optimizer = optimizer_of(model)
    state.overlap_reduction = overlap
    state.bucket_bytes = 4096  # several buckets per group even for this small model
    reduction = state.gradient_reduction(model)
    launched: list[int] = []  # buckets launched before `finish`, per step
    finish = reduction.finish
    reduction.finish = lambda: (launched.append(reduction._next), finish())[1]
    losses = []
    for step in range(STEPS):
        batches = []
        for micro in range(MICRO):
            x, y = global_micro_batch(step, micro, topology.dp)
            rows = slice(topology.dp_index * ROWS, (topology.dp_index + 1) * ROWS)
            batches.append((x[rows], y[rows]))
        losses.append(train_step(model, optimizer, batches, grad_clip=1.0, parallel=state).loss)
    torch.save({"losses": losses, "launched": launched, "buckets": len(reduction.buckets)}, f"{out_dir}/rank{rank}.pt")


def reference_losses(dp: int) -> list[float]:
    model = build()
    optimizer = optimizer_of(model)
    return [
        train_step(model, optimizer, [global_micro_batch(step, m, dp) for m in range(MICRO)], grad_clip=1.0).loss
        for step in range(STEPS)
    ]


@pytest.mark.parametrize(("world", "tp", "ep", "overlap"), [(2, 1, 2, True), (4, 2, 2, True), (2, 1, 2, False)])
def test_overlapped_reduction_follows_one_process(tmp_path, world, tp, ep, overlap):
    run_workers(_worker, world, tmp_path, tp, ep, overlap, str(tmp_path))
    dp = world // tp
    reference = reference_losses(dp)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for step in range(STEPS):
        # every TP rank of a data-parallel index computes its loss; the mean over ranks is the global one
        mean = sum(r["losses"][step] for r in ranks) / world
        assert mean == pytest.approx(reference[step], rel=1e-6), step
    assert reference[-1] < reference[0]
    for result in ranks:
        assert result["buckets"] > 2
        assert result["launched"] == [result["buckets"] if overlap else 0] * STEPS
