"""Validation split over the data-parallel ranks == one process: each rank evaluates its share of
every global batch (a rank with no rows of a short last batch runs one row weighted zero) and the
sums are all-reduced, under expert parallelism, TP x EP (MoE tokens split over TP) and
expert-slicing (tokens whole on every TP rank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distributed import run_workers

from pyramoe.comm import Topology
from pyramoe.config import ModelConfig, build_layers
from pyramoe.data import TokenDataset
from pyramoe.models import GPT
from pyramoe.parallel import parallelize
from pyramoe.train.evaluate import RankShare, evaluate

VOCAB = 97
SEQ = 8
BATCH = 3  # global rows per batch: uneven shares over 2 data-parallel ranks
WINDOWS = 7  # batches of 3, 3 and 1 row: one rank gets no row of the last


def build() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(
        vocab_size=VOCAB, max_seq_len=32, d_model=32, n_heads=4,
        layers=build_layers(4, "every_other", 4, top_k=2, dropless=True, use_residual=True),
    ))


def dataset(tmp_path) -> TokenDataset:
    path = tmp_path / "val.bin"
    if not path.exists():
        tokens = np.random.default_rng(7).integers(0, VOCAB, WINDOWS * SEQ + 1, dtype=np.uint16)
        tokens.tofile(path)
    return TokenDataset(path, np.uint16)


def as_record(result) -> dict:
    return {"loss": result.loss, "tokens": result.tokens, "batch_losses": result.batch_losses,
            "load": {i: (x.routed, x.kept) for i, x in result.load.items()}}


def _worker(rank: int, world: int, tp: int, ep: int, slicing: bool, out_dir: str) -> None:
    from pathlib import Path

    topology = Topology(world, rank, tp=tp)
    model = build()
    parallelize(model, topology, ep=ep, expert_slicing=slicing)
    share = RankShare(topology.dp_index, topology.dp, topology.tp_index == 0, torch.device("cpu"))
    result = evaluate(model, dataset(Path(out_dir)), BATCH, SEQ, 10, share=share)
    torch.save(as_record(result), f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize(
    ("world", "tp", "ep", "slicing"),
    [(2, 1, 2, False), (4, 2, 2, False), (4, 2, 2, True)],
)
def test_split_evaluation_equals_one_process(tmp_path, world, tp, ep, slicing):
    dataset(tmp_path)
    run_workers(_worker, world, tmp_path, tp, ep, slicing, str(tmp_path))
    reference = as_record(evaluate(build(), dataset(tmp_path), BATCH, SEQ, 10))
    assert len(reference["batch_losses"]) == 3 and reference["load"]
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["tokens"] == reference["tokens"] == WINDOWS * SEQ
        assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-7), rank
        assert got["batch_losses"] == pytest.approx(reference["batch_losses"], rel=1e-6, abs=1e-7), rank
        assert got["load"] == reference["load"], rank
