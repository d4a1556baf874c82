"""ZeRO-style sharding with FSDP2 (`parallelize(..., zero=True)`): EP=2 on 2 ranks, EP=2 x
expert-data-parallel 2 on 4 ranks, and DP=2 x TP=2 on 4 ranks (EP=2 with the tokens split over
TP; EP=1 with the experts sliced over TP) take the same AdamW steps (clipped, gradient
accumulation) as the unsharded engine, while each rank holds a fraction of the parameters and
moments."""

from __future__ import annotations

import pytest
import torch
from distributed import run_workers
from torch.distributed.tensor import DTensor

from pyramoe.comm import Topology
from pyramoe.config import ModelConfig, build_layers
from pyramoe.models import GPT
from pyramoe.parallel import parallelize
from pyramoe.train.config import TrainConfig
from pyramoe.train.optim import make_optimizer, set_lr
from pyramoe.train.trainer import train_step

VOCAB = 97
STEPS = 3
ROWS = 2


def build() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(
        vocab_size=VOCAB, max_seq_len=32, d_model=32, n_heads=4,
        layers=build_layers(4, "every_other", 4, top_k=2, dropless=True, use_residual=True),
    ))


def micro_batches(step: int, dp_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for micro in range(2):
        seed = 100 * step + 10 * micro + dp_index
        idx = torch.randint(0, VOCAB, (ROWS, 13), generator=torch.Generator().manual_seed(seed))
        out.append((idx[:, :-1].contiguous(), idx[:, 1:].contiguous()))
    return out


def local_bytes(model: GPT, optimizer: torch.optim.Optimizer) -> int:
    """Parameters and optimizer state this rank holds."""
    def size(t: torch.Tensor) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()
    moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    return sum(size(p) for p in model.parameters()) + sum(size(v) for v in moments)


def _worker(rank: int, world: int, zero: bool, out_dir: str, tp: int, ep: int, slicing: bool,
            node: int | None) -> None:
    topology = Topology(world, rank, tp=tp, ranks_per_node=node)
    model = build()
    state = parallelize(model, topology, ep=ep, zero=zero, expert_slicing=slicing, hierarchical=node is not None)
    optimizer = make_optimizer(model, TrainConfig())
    set_lr(optimizer, 1e-3)
    losses = [train_step(model, optimizer, micro_batches(step, topology.dp_index), grad_clip=0.5, parallel=state)
              for step in range(STEPS)]
    torch.save({"loss": [s.loss for s in losses], "norm": [s.grad_norm for s in losses],
                "bytes": local_bytes(model, optimizer)}, f"{out_dir}/{zero}-rank{rank}.pt")


# node: ranks per emulated node, for the hierarchical all-to-all (None: flat).
@pytest.mark.parametrize("world, tp, ep, slicing, node", [(2, 1, 2, False, None), (4, 1, 2, False, None),
                                                         (4, 2, 2, False, None), (4, 2, 1, True, None),
                                                         (4, 1, 4, False, 2)])
def test_sharded_steps_equal_the_unsharded_engine(tmp_path, world, tp, ep, slicing, node):
    for zero in (False, True):
        (tmp_path / str(zero)).mkdir()
        run_workers(_worker, world, tmp_path / str(zero), zero, str(tmp_path), tp, ep, slicing, node)
    plain = [torch.load(tmp_path / f"False-rank{r}.pt", weights_only=True) for r in range(world)]
    sharded = [torch.load(tmp_path / f"True-rank{r}.pt", weights_only=True) for r in range(world)]
    for rank in range(world):
        assert sharded[rank]["loss"] == pytest.approx(plain[rank]["loss"], rel=1e-6), rank
        assert sharded[rank]["norm"] == pytest.approx(plain[rank]["norm"], rel=1e-5), rank
        # dense parameters and moments split over DP ranks, experts over their DP/EP replicas
        assert sharded[rank]["bytes"] < 0.75 * plain[rank]["bytes"], rank
    assert plain[0]["loss"][-1] != plain[0]["loss"][0]
