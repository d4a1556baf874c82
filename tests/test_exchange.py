"""Flat vs hierarchical all-to-all on gloo: the same rows arrive in the same order, bit for bit,
forward and backward, with unequal splits (empty runs included)."""

from __future__ import annotations

import pytest
import torch
from distributed import run_workers

from pyramoe.comm import FlatExchange, HierarchicalExchange, ProcessGroups, Topology, build_exchange

WIDTH = 3


def send_splits(rank: int, world: int) -> list[int]:
    g = torch.Generator().manual_seed(rank)
    splits = torch.randint(0, 5, (world,), generator=g)
    splits[(rank + 1) % world] = 0  # an empty run
    return splits.tolist()


def rows(rank: int, world: int) -> torch.Tensor:
    n = sum(send_splits(rank, world))
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(1000 + rank), dtype=torch.float64)


def _worker(rank: int, world: int, per_node: int, out_dir: str) -> None:
    topology = Topology(world, rank, ranks_per_node=per_node)
    groups = ProcessGroups(topology)
    flat = build_exchange(groups, world, hierarchical=False)
    hier = build_exchange(groups, world, hierarchical=True)
    assert isinstance(flat, FlatExchange) and isinstance(hier, HierarchicalExchange)
    results = {}
    known = [send_splits(source, world)[rank] for source in range(world)]  # what a count table told
    cases = (("flat", flat, None), ("hier", hier, None), ("hier_known", hier, known), ("flat_known", flat, known))
    for name, exchange, recv_splits in cases:
        x = rows(rank, world).requires_grad_()
        out, received = exchange(x, send_splits(rank, world), recv_splits)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(rank), dtype=out.dtype)
        out.backward(grad)
        results[name] = dict(out=out.detach(), received=received, grad=x.grad)
    table = torch.tensor([[rank, q] for q in range(world)])  # row q goes to rank q
    results["table"], _ = hier(table, [1] * world, [1] * world)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize(("world", "per_node"), [(4, 2), (8, 4), (8, 2)])
def test_hierarchical_equals_flat(tmp_path, world, per_node):
    run_workers(_worker, world, tmp_path, per_node, str(tmp_path))
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # What every source sent this rank, in source order.
        expected, counts = [], []
        for source in range(world):
            splits = send_splits(source, world)
            start = sum(splits[:rank])
            expected.append(rows(source, world)[start : start + splits[rank]])
            counts.append(splits[rank])
        torch.testing.assert_close(got["flat"]["out"], torch.cat(expected), rtol=0, atol=0)
        assert got["flat"]["received"] == got["hier"]["received"] == counts
        assert torch.equal(got["hier"]["out"], got["flat"]["out"])
        assert torch.equal(got["hier"]["grad"], got["flat"]["grad"])
        for name in ("hier_known", "flat_known"):  # given the counts: the same rows, fewer count rounds
            assert got[name]["received"] == counts
            assert torch.equal(got[name]["out"], got["flat"]["out"])
            assert torch.equal(got[name]["grad"], got["flat"]["grad"])
        # Equal splits (a count table: one row to every rank) need no count exchange at all.
        assert torch.equal(got["table"], torch.tensor([[source, rank] for source in range(world)]))


def test_node_layouts_and_partitions():
    t = Topology(world_size=8, rank=0, ranks_per_node=4)
    assert t.ep_node_layout(8) == (2, 4) and t.ep_node_layout(4) == (1, 4)
    assert t.ep_local_partition(8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert t.ep_cross_partition(8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ValueError, match="unevenly"):
        Topology(world_size=6, rank=0, ranks_per_node=2).ep_node_layout(3)
