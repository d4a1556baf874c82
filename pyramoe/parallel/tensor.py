"""Tensor parallelism applied to built modules: attention heads and dense-MLP hidden units split
over the ranks of a TP group (Megatron's column/row parallel linears), and the MoE layer's tokens
split over them (the paper's parallelism-coordinated communication).

- Column-parallel (q/k/v, MLP in): rank r keeps its share of the output rows of every fused block
  ([q | k | v], [gate | up]), so each rank computes whole heads / whole hidden units.
- Row-parallel (attention out, MLP out): rank r keeps the matching input columns; the partial sums
  are all-reduced and the bias is added once, after the reduction.
- MoE: the TP ranks hold the same tokens, so each routes only its 1/TP share, the all-to-all runs
  among ranks of the same TP index (the expert-parallel groups), and the outputs are all-gathered
  inside the TP group. Its aux losses are scaled by 1/TP, so the objective holds their mean over
  the shares.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pyramoe.dist.tensor_ops import copy_to_tp, gather_from_tp, reduce_from_tp, split_to_tp
from pyramoe.layers.attention import CausalSelfAttention


def _shard_index(blocks: Sequence[int], rank: int, size: int, what: str) -> torch.Tensor:
    """Indices of rank's share of each consecutive block of the given sizes."""
    index, offset = [], 0
    for block in blocks:
        if block % size:
            raise ValueError(f"tp: {what} of size {block} does not split over {size} ranks")
        share = block // size
        index.append(torch.arange(offset + rank * share, offset + (rank + 1) * share))
        offset += block
    return torch.cat(index)


class ColumnParallelLinear(nn.Module):
    def __init__(self, linear: nn.Linear, blocks: Sequence[int], group: dist.ProcessGroup, what: str):
        super().__init__()
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        rows = _shard_index(blocks, rank, size, what).to(linear.weight.device)
        self.group = group
        self.blocks = tuple(blocks)  # the fused blocks of the full output rows, each split over TP
        self.weight = nn.Parameter(linear.weight.detach().index_select(0, rows).clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().index_select(0, rows).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, linear: nn.Linear, blocks: Sequence[int], group: dist.ProcessGroup, what: str):
        super().__init__()
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        cols = _shard_index(blocks, rank, size, what).to(linear.weight.device)
        self.group = group
        self.blocks = tuple(blocks)  # of the full input columns
        self.weight = nn.Parameter(linear.weight.detach().index_select(1, cols).clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class TPTokenSplit:
    """The MoE layer's token split over a TP group (set as `MoELayer.token_split`)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.aux_scale = 1.0 / self.size

    def splits(self, num_tokens: int) -> bool:
        """Split unless some rank would get no token: then, at inference (a decode step of fewer
        requests than TP ranks), every rank routes all tokens and all get the same output."""
        if num_tokens >= self.size:
            return True
        if torch.is_grad_enabled():
            raise ValueError(f"tp: {num_tokens} tokens cannot be split over {self.size} ranks for training")
        return False

    def split(self, x_TD: torch.Tensor) -> torch.Tensor:
        return split_to_tp(x_TD, self.group)

    def gather(self, y_local: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return gather_from_tp(y_local, num_tokens, self.group)


def shard_attention(
    attn: nn.Module, group: dist.ProcessGroup, layer: int
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split attention heads (and key/value heads) over the TP group. Returns the sharded parameters
    and the replicated ones whose gradient each rank sees only for its heads (per-head q/k norms)."""
    size = dist.get_world_size(group)
    where = f"layers[{layer}].attn"
    if not isinstance(attn, CausalSelfAttention):
        raise ValueError(f"tp: {where} is {type(attn).__name__}, which tensor parallelism does not slice yet")
    for name in ("n_heads", "n_kv_heads"):
        if getattr(attn, name) % size:
            raise ValueError(f"tp: {where}.{name}={getattr(attn, name)} does not split over {size} ranks")
    if attn.qk_norm == "full":
        raise ValueError(f"tp: {where} normalises q/k over all heads together (qk_norm='full'); not sliceable")
    attn.qkv = ColumnParallelLinear(attn.qkv, attn.split, group, f"{where}.qkv")
    attn.proj = RowParallelLinear(attn.proj, (attn.split[0],), group, f"{where}.proj")
    attn.n_heads //= size
    attn.n_kv_heads //= size
    attn.split = tuple(width // size for width in attn.split)
    sharded = [attn.qkv.weight, attn.proj.weight] + ([attn.qkv.bias] if attn.qkv.bias is not None else [])
    per_head = [p for name in ("q_norm", "k_norm") if hasattr(attn, name) for p in getattr(attn, name).parameters()]
    return sharded, per_head


def shard_mlp(mlp: nn.Module, group: dist.ProcessGroup, where: str) -> list[nn.Parameter]:
    """Split a dense MLP's hidden units over the TP group (gate and up halves alike for SwiGLU)."""
    d_ff = mlp.fc_out.in_features
    blocks = (d_ff, d_ff) if mlp.activation == "swiglu" else (d_ff,)
    mlp.fc_in = ColumnParallelLinear(mlp.fc_in, blocks, group, f"{where}.fc_in")
    mlp.fc_out = RowParallelLinear(mlp.fc_out, (d_ff,), group, f"{where}.fc_out")
    return [mlp.fc_in.weight, mlp.fc_out.weight] + ([mlp.fc_in.bias] if mlp.fc_in.bias is not None else [])


def tp_layouts(model: nn.Module) -> dict[str, tuple[int, tuple[int, ...], dist.ProcessGroup]]:
    """name -> (dimension, full block sizes, TP group) of every tensor-parallel slice in `model`."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ColumnParallelLinear):
            out[f"{prefix}.weight"] = (0, module.blocks, module.group)
            if module.bias is not None:
                out[f"{prefix}.bias"] = (0, module.blocks, module.group)
        elif isinstance(module, RowParallelLinear):
            out[f"{prefix}.weight"] = (1, module.blocks, module.group)
    return out


def cut_tp(full: torch.Tensor, dim: int, blocks: Sequence[int], rank: int, size: int) -> torch.Tensor:
    """This rank's slice of a full tensor: its share of every block along `dim`."""
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in full.split(list(blocks), dim=dim)], dim=dim)


def join_tp(parts: Sequence[torch.Tensor], dim: int, blocks: Sequence[int]) -> torch.Tensor:
    """The full tensor from every rank's slice (rank order): block by block, rank by rank."""
    size = len(parts)
    shares = [b // size for b in blocks]
    split = [p.split(shares, dim=dim) for p in parts]
    return torch.cat([split[r][b] for b in range(len(blocks)) for r in range(size)], dim=dim)
