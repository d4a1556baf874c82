"""Autograd collectives of tensor parallelism (Megatron's conjugate pairs), over a TP group.

- `copy_to_tp`: identity forward, all-reduce of the gradient backward: in front of a column-parallel
  layer, whose every rank consumes the same input.
- `reduce_from_tp`: all-reduce forward (the partial sums of a row-parallel layer), identity backward.
- `split_to_tp` / `gather_from_tp`: rank r keeps its 1/TP share of the rows (forward) and the rows
  are gathered back (forward); each is the other's backward. Uneven row counts are padded to equal
  chunks for the all-gather and trimmed after, so any token count works (a decode step's one token).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _chunk_bounds(rows: int, rank: int, size: int) -> tuple[int, int]:
    chunk = math.ceil(rows / size)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def _all_gather_rows(x: torch.Tensor, rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    chunk = math.ceil(rows / size)
    padded = x.new_zeros((chunk, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[: e - s] for p, (s, e) in zip(parts, (_chunk_bounds(rows, r, size) for r in range(size)))])


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # noqa: ANN001, ANN205
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # noqa: ANN001, ANN205
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad, None


class _SplitToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # noqa: ANN001, ANN205
        ctx.group, ctx.rows = group, x.shape[0]
        start, end = _chunk_bounds(x.shape[0], dist.get_rank(group), dist.get_world_size(group))
        return x[start:end].contiguous()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return _all_gather_rows(grad, ctx.rows, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, group):  # noqa: ANN001, ANN205
        ctx.group, ctx.rows = group, rows
        return _all_gather_rows(x, rows, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        start, end = _chunk_bounds(ctx.rows, dist.get_rank(ctx.group), dist.get_world_size(ctx.group))
        return grad[start:end].contiguous(), None, None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def split_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's share of the rows of x (dimension 0)."""
    return _SplitToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's share back into `rows` rows, in rank order."""
    return _GatherFromTP.apply(x, rows, group)
