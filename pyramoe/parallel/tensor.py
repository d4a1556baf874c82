"""Tensor parallelism applied to built modules: attention heads and dense-MLP hidden units split
over the ranks of a TP group (Megatron's column/row parallel linears), and the MoE layer's tokens
split over them (the paper's parallelism-coordinated communication).

- Column-parallel (q/k/v, MLP in): rank r keeps its share of the output rows of every fused block
  ([q | k | v], [gate | up]), so each rank computes whole heads / whole hidden units.
- Row-parallel (attention out, MLP out): rank r keeps the matching input columns; the partial sums
  are all-reduced and the bias is added once, after the reduction.
- MoE, coordinated (default): the TP ranks hold the same tokens, so each routes only its 1/TP
  share, the all-to-all runs among ranks of the same TP index (the expert-parallel groups), and
  the outputs are all-gathered inside the TP group. Its aux losses are scaled by 1/TP, so the
  objective holds their mean over the shares.
- MoE, expert-slicing: every expert's hidden units split over the TP group instead (`SlicedExperts`),
  the tokens not split: for fewer experts than ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pyramoe.comm.tensor_ops import copy_to_tp, gather_from_tp, reduce_from_tp, split_to_tp
from pyramoe.layers.attention import CausalSelfAttention
from pyramoe.layers.experts import grouped_linear
from pyramoe.layers.mlp import activate


class ColumnParallelLinear(nn.Module):
    def __init__(self, linear: nn.Linear, blocks: Sequence[int], group: dist.ProcessGroup, what: str):
        super().__init__()
        self.group = group
        self.blocks = tuple(blocks)  # the fused blocks of the full output rows, each split over TP
        self.weight = _slice(linear.weight, 0, blocks, group, what)
        self.bias = None if linear.bias is None else _slice(linear.bias, 0, blocks, group, what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, linear: nn.Linear, blocks: Sequence[int], group: dist.ProcessGroup, what: str):
        super().__init__()
        self.group = group
        self.blocks = tuple(blocks)  # of the full input columns
        self.weight = _slice(linear.weight, 1, blocks, group, what)
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
        elif isinstance(module, SlicedExperts):
            out[f"{prefix}.w_in"] = (1, module.blocks_in, module.group)
            out[f"{prefix}.w_out"] = (2, module.blocks_out, module.group)
            if module.b_in is not None:
                out[f"{prefix}.b_in"] = (2, module.blocks_in, module.group)
    return out


def cut_tp(
    full: torch.Tensor, dim: int, blocks: Sequence[int], rank: int, size: int, what: str = "tensor"
) -> torch.Tensor:
    """This rank's slice of a full tensor: its share of every block along `dim` (fused blocks such
    as [q | k | v] or [gate | up] are split one by one). ValueError when a block does not split."""
    for block in blocks:
        if block % size:
            raise ValueError(f"tp: {what} of size {block} does not split over {size} ranks")
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in full.split(list(blocks), dim=dim)], dim=dim)


def _slice(t: torch.Tensor, dim: int, blocks: Sequence[int], group: dist.ProcessGroup, what: str) -> nn.Parameter:
    """This rank's slice of a module's tensor, as a parameter of its own."""
    part = cut_tp(t.detach(), dim, blocks, dist.get_rank(group), dist.get_world_size(group), what)
    return nn.Parameter(part.clone())


def join_tp(parts: Sequence[torch.Tensor], dim: int, blocks: Sequence[int]) -> torch.Tensor:
    """The full tensor from every rank's slice (rank order): block by block, rank by rank."""
    size = len(parts)
    shares = [b // size for b in blocks]
    split = [p.split(shares, dim=dim) for p in parts]
    return torch.cat([split[r][b] for b in range(len(blocks)) for r in range(size)], dim=dim)


class SlicedExperts(nn.Module):
    """Expert-slicing: every expert's hidden units split over the TP group, for layers with fewer
    experts than ranks to spread them over. Each rank holds all (local) experts' slices of w_in
    (gate and up halves alike for SwiGLU), b_in and w_out; the tokens are not split, the partial
    outputs are all-reduced in the TP group and b_out (whole on every rank) is added after.
    Parameter names match `GroupedExperts`, so checkpoints stay in the single-process layout."""

    def __init__(self, experts: nn.Module, group: dist.ProcessGroup, where: str):
        super().__init__()
        d_ff = experts.w_out.shape[2]
        self.blocks_in = (d_ff, d_ff) if experts.activation == "swiglu" else (d_ff,)
        self.blocks_out = (d_ff,)
        self.group, self.activation = group, experts.activation
        self.num_experts, self.expert_offset = experts.num_experts, experts.expert_offset
        what = f"{where}.experts"
        self.w_in = _slice(experts.w_in, 1, self.blocks_in, group, what)
        self.w_out = _slice(experts.w_out, 2, self.blocks_out, group, what)
        self.b_in = None if experts.b_in is None else _slice(experts.b_in, 2, self.blocks_in, group, what)
        self.b_out = None if experts.b_out is None else nn.Parameter(experts.b_out.detach().clone())

    def forward(
        self, x_rows: torch.Tensor, tokens_per_expert: torch.Tensor, rows_per_expert: int | None,
        host_counts: list[int] | None = None,
    ) -> torch.Tensor:
        x = copy_to_tp(x_rows, self.group)
        if rows_per_expert is not None:
            x, counts = x.view(self.num_experts, rows_per_expert, -1), None
        else:
            counts = host_counts if host_counts is not None else tokens_per_expert.tolist()
        h = grouped_linear(x, self.w_in, self.b_in, counts)
        y = grouped_linear(activate(h, self.activation), self.w_out, None, counts)
        y = reduce_from_tp(y if counts is not None else y.flatten(0, 1), self.group)
        if self.b_out is None:
            return y
        if counts is None:
            rows_E = torch.full((self.num_experts,), rows_per_expert, device=y.device)
        else:
            rows_E = tokens_per_expert.to(y.device)
        experts_E = torch.arange(self.num_experts, device=y.device)
        expert_N = torch.repeat_interleave(experts_E, rows_E, output_size=y.shape[0])
        return y + self.b_out[:, 0].to(y.dtype).index_select(0, expert_N)
