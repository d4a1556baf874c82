"""Autograd all-to-all with unequal splits, on torch.distributed (gloo on CPU, NCCL on GPU).

Legend: W ranks in the group, L experts per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Rank r sends rows input_splits[q] to rank q and receives output_splits[q] rows from q; the
    backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):  # noqa: ANN001, ANN205
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        output_splits, input_splits = ctx.splits
        return _exchange(grad_out, input_splits, output_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Differentiable all_to_all_single over the first dimension."""
    return _AllToAll.apply(x, output_splits, input_splits, group)
