"""Every torch.distributed collective gets its tensors on the run's device (NCCL takes no CPU
tensor): a static pass over the package and a 2-rank gloo run with every collective guarded, each
shown to catch the mistakes it exists for (`collective_check`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
import torch.distributed as dist
from collective_check import HostBornTaint, host_born_collectives, install_collective_guard
from distributed import run_workers

from pyramoe.comm import Topology
from pyramoe.config import ModelConfig, build_layers
from pyramoe.models import GPT
from pyramoe.parallel import parallelize
from pyramoe.parallel.launch import DistRun
from pyramoe.train.trainer import train_step

PACKAGE = Path(__file__).resolve().parents[1] / "pyramoe"
VOCAB = 61


def test_no_collective_in_the_package_gets_a_host_born_tensor():
    assert host_born_collectives(sorted(PACKAGE.rglob("*.py"))) == []


def test_the_static_check_finds_tables_and_buckets_made_on_the_host(tmp_path):
    """The mistakes issue 17 found: count tables by torch.tensor(splits) passed through a helper to
    all_to_all_single, an autograd Function's forward, and an empty bucket by torch.as_tensor(0.0)."""
    source = tmp_path / "bad.py"
    source.write_text(textwrap.dedent('''
        import torch
        import torch.distributed as dist

        def _exchange_counts(counts, group):
            out = torch.empty_like(counts)
            dist.all_to_all_single(out.view(-1), counts.contiguous().view(-1), group=group)
            return out

        class _Sum(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, group):
                dist.all_reduce(x, group=group)
                return x

        def flat(x, send_splits, group):
            sent = torch.tensor(send_splits, dtype=torch.int64).view(-1, 1)
            ok = torch.tensor(send_splits, device=x.device)
            _exchange_counts(ok, group)
            return _exchange_counts(sent, group)

        def hierarchical(x, send_splits, group):
            sizes = torch.tensor(send_splits).view(2, 2)
            return _exchange_counts(sizes.t().contiguous(), group), _Sum.apply(sizes * 2, group)

        def norm(squares, group):
            square = torch.as_tensor(squares.get(1, 0.0), dtype=torch.float32)
            dist.all_reduce(square, group=group)
            moved = squares[0].cpu()
            torch.distributed.all_reduce(moved)
    '''))
    problems = host_born_collectives([source])
    assert [p.split(": ", 1)[1] for p in problems] == [
        "_exchange_counts(...) gets host-born sent",
        "_exchange_counts(...) gets host-born sizes.t().contiguous()",
        "_Sum.forward(...) gets host-born sizes * 2",
        "dist.all_reduce(...) gets host-born square",
        "dist.all_reduce(...) gets host-born moved",
    ]


def build() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=VOCAB, max_seq_len=16, d_model=16, n_heads=2, aux_loss_coef=0.01,
                           layers=build_layers(2, "every_other", 4, top_k=2)))


def _guarded_worker(rank: int, world: int, out_dir: str) -> None:
    taint = HostBornTaint()
    install_collective_guard(taint)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(rank))
    batch = (tokens[:, :-1], tokens[:, 1:].contiguous())
    # Flat and hierarchical EP=2 (each rank its own node), TP=2 with the MoE tokens split, and
    # expert-slicing; models built outside the guard: they stand for a model moved to the device.
    layouts = [dict(ep=2), dict(ep=2, hierarchical=True), dict(tp=2), dict(tp=2, expert_slicing=True)]
    for layout in layouts:
        topology = Topology(world, rank, tp=layout.pop("tp", 1), ranks_per_node=1)
        model = build()
        state = parallelize(model, topology, **layout)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with taint:
            train_step(model, optimizer, [batch], grad_clip=1.0, parallel=state)
            run = DistRun(topology, state)
            run.mean([1.0, 2.0])
            run.any(False)
            with torch.no_grad():
                model.eval()(batch[0])  # evaluation and generation: forward only
    caught = ""
    with taint:
        try:
            dist.all_reduce(torch.tensor([1.0]))  # what the guard exists for
        except AssertionError as exc:
            caught = str(exc)
    Path(out_dir, f"rank{rank}.txt").write_text(f"{taint.seen}\n{caught}")


def test_a_guarded_two_rank_run_gives_every_collective_a_device_tensor(tmp_path):
    run_workers(_guarded_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        seen, caught = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert int(seen) > 20  # the collectives of four training steps and forwards were checked
        assert caught.startswith("dist.all_reduce got a host-born tensor (1,)")
