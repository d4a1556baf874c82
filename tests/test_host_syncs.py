"""Host synchronisation of an expert-parallel MoE layer: the flat and the hierarchical path wait on
the device once per MoE layer forward (its count table), never in combine or backward. Counted on the CPU by
wrapping the tensor methods that read device memory from the host (a GPU run would use
torch.cuda.set_sync_debug_mode)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from distributed import run_workers

from pyramoe.comm import Topology
from pyramoe.config import ModelConfig, build_layers
from pyramoe.models import GPT
from pyramoe.parallel import parallelize

SYNC_POINTS = ("tolist", "item", "cpu", "__int__", "__float__", "__bool__", "__index__", "nonzero")
VOCAB = 61


class SyncCounter:
    """Counts calls of `SYNC_POINTS` on tensors while active."""

    def __init__(self) -> None:
        self.count = 0
        self._real = {name: getattr(torch.Tensor, name) for name in SYNC_POINTS}

    def __enter__(self) -> SyncCounter:
        for name, real in self._real.items():
            def counted(tensor, *args, _real=real, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
                self.count += 1
                return _real(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, real in self._real.items():
            setattr(torch.Tensor, name, real)


def _worker(rank: int, world: int, out_dir: str) -> None:
    results = {}
    for hierarchical in (False, True):
        torch.manual_seed(0)
        # Two MoE layers (blocks 1 and 3), dropless; each rank its own node for the hierarchical one.
        model = GPT(ModelConfig(vocab_size=VOCAB, max_seq_len=16, d_model=16, n_heads=2,
                                layers=build_layers(4, "every_other", 4, top_k=2, dropless=True)))
        parallelize(model, Topology(world, rank, ranks_per_node=1), ep=2, hierarchical=hierarchical)
        x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(rank))
        out = model(x)  # warm-up: lazy initialisation stays out of the count
        out.logits.sum().backward()
        with SyncCounter() as forward:
            out = model(x)
        loss = out.logits.float().sum()
        with SyncCounter() as backward:
            loss.backward()
        results["hierarchical" if hierarchical else "flat"] = [forward.count, backward.count]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def test_the_exchanges_wait_on_the_device_once_per_moe_layer_forward(tmp_path):
    run_workers(_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["flat"] == [2, 0]  # two MoE layers, one count table each; none in backward
        # Hierarchical: the first hop's counts of dispatch and combine come to the host with the
        # count table, in its one copy.
        assert got["hierarchical"] == [2, 0]


def test_the_counter_counts():
    t = torch.arange(3)
    with SyncCounter() as counter:
        t.tolist(), int(t[0]), t.sum().item(), bool(t.any())
    assert counter.count == 4
    assert t.tolist() == [0, 1, 2] and counter.count == 4  # restored on exit
