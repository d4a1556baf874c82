"""An MoE layer's inference forward for accelerators: no host sync and no shape that depends on
routing, so a decode step can be captured once (a CUDA graph) and replayed.

Routing runs as usual (`Router`: fp32 scores, top-k on the device). The assignments then go
through the dense token-to-expert table of the DeepSpeed-MoE paper: a [A, E] one-hot table whose
column sums are the rows per expert and whose column-wise cumsum gives each assignment's rank in
its expert, so each assignment's row in an expert-ordered buffer of exactly A = T*K rows is
start[expert] + rank, computed with no sort and no host round trip. The experts run as two grouped
GEMMs over that buffer (`torch._grouped_mm`, offsets from the cumsum), and the rows come back to
assignment order by a gather and are summed over each token's K choices.

The combine gathers rather than `index_add`s: on CUDA index_add accumulates with atomics, whose
order (and so, from three choices on, whose rounding) changes from run to run; a gather and a sum
over K is exact to repeat and costs the same.

Legend: T tokens, D width, E experts, K choices per token, A = T*K assignments, I / O a
projection's input / output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyramoe.layers.dispatch import LocalDispatcher, combine_weights
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.mlp import activate
from pyramoe.layers.moe import MoELayer

# torch._grouped_mm wants every stride a multiple of 16 bytes.
GROUPED_MM_ALIGN_BYTES = 16


def spread_over_processes(layer: MoELayer) -> bool:
    """The layer's experts or tokens are spread over processes: expert parallelism, tensor
    parallelism's token split, or its expert slicing (`SlicedExperts` carries its TP group)."""
    return (type(layer.dispatcher) is not LocalDispatcher or layer.token_split is not None
            or getattr(layer.experts, "group", None) is not None)


def device_moe_unsupported(layer: MoELayer, token_split: bool = False) -> str | None:
    """Why `DeviceMoE` cannot run this layer, or None. `token_split`: the caller splits the tokens
    over the TP group itself (`DeviceMoE` then runs on this rank's share; experts must be local)."""
    if not layer.config.dropless:
        return "the layer drops tokens past a capacity (device MoE is dropless)"
    if type(layer.dispatcher) is not LocalDispatcher or (layer.token_split is not None and not token_split):
        return "the layer's experts are spread over processes (expert or tensor parallelism)"
    if type(layer.experts) is not GroupedExperts or layer.experts.w_in is None:
        return "the layer's experts are packed for the CPU or not grouped experts"
    return None


def grouped_mm_runs(weight: torch.Tensor) -> bool:
    """torch._grouped_mm computes this dtype on this device: fp32 and bf16 on the CPU, bf16 on CUDA."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if weight.device.type == "cpu":
        return weight.dtype in (torch.float32, torch.bfloat16)
    return weight.dtype == torch.bfloat16


class DeviceMoE:
    """`layer`'s inference forward (same router, experts, Residual-MoE mix and shared expert) on
    whatever device it lives on. Built once per layer: weights whose widths break _grouped_mm's
    alignment get a zero-padded copy here, the others are used in place. `token_split`: see
    `device_moe_unsupported` (the layer's own `token_split` is not applied here)."""

    def __init__(self, layer: MoELayer, token_split: bool = False):
        reason = device_moe_unsupported(layer, token_split)
        if reason is not None:
            raise ValueError(f"device moe: {reason}")
        experts = layer.experts
        self.layer, self.num_experts, self.activation = layer, experts.num_experts, experts.activation
        self.grouped = grouped_mm_runs(experts.w_in)
        self.w_in_EOI, self.w_out_EOI = experts.w_in, experts.w_out
        if self.grouped:
            self.w_in_EOI, self.w_out_EOI = _aligned(experts.w_in), _aligned(experts.w_out)
        self.in_width, self.out_width = experts.w_in.shape[1], experts.w_out.shape[1]
        self.b_in, self.b_out = experts.b_in, experts.b_out

    def __call__(self, x_TD: torch.Tensor, real_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output [T, D] and the real tokens' assignments per expert [E] (int64).
        `real_T` (bool): rows that are padding are routed and computed like the others (the shapes
        stay fixed) but count in no statistic; their outputs mean nothing."""
        layer = self.layer
        routing = layer.router(x_TD)
        y_TD, routed_E = self._experts(x_TD, routing.expert_idx_TK, combine_weights(routing, None), real_T)
        if layer.residual_mlp is not None:
            coef_T2 = torch.softmax(layer.coefficient(x_TD), dim=-1)
            y_TD = y_TD * coef_T2[:, :1] + layer.residual_mlp(x_TD) * coef_T2[:, 1:]
        if layer.shared_expert is not None:
            y_TD = y_TD + layer._shared(x_TD)  # the layer's own shared-expert mix, gate included
        return y_TD, routed_E

    def _experts(self, x_TD: torch.Tensor, expert_TK: torch.Tensor, weight_TK: torch.Tensor,
                 real_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, top_k = expert_TK.shape
        table = ExpertTable(expert_TK, self.num_experts)
        expert_R, ends_E = table.expert_of_row_R, table.ends_E
        x_RD = x_TD.index_select(0, table.token_of_row_R)
        h_RF = self._project(x_RD, self.w_in_EOI, self.b_in, self.in_width, expert_R, ends_E)
        y_RD = self._project(activate(h_RF, self.activation), self.w_out_EOI, self.b_out, self.out_width,
                             expert_R, ends_E)
        y_AD = y_RD.index_select(0, table.row_of_assignment_A) * weight_TK.reshape(-1, 1).to(y_RD.dtype)
        y_TD = y_AD.view(tokens, top_k, -1).sum(dim=1)
        counted_A = None if real_T is None else real_T.reshape(-1, 1).expand(tokens, top_k).reshape(-1)
        return y_TD, table.count(counted_A)

    def _project(self, x_RI: torch.Tensor, weight_EOI: torch.Tensor, bias_E1O: torch.Tensor | None, width: int,
                 expert_R: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
        """Row r times its expert's weight (+ bias): one grouped GEMM, or (where _grouped_mm does
        not compute the dtype) a batched GEMV over each row's gathered weight, still of fixed shape."""
        if self.grouped:
            if x_RI.shape[1] != weight_EOI.shape[2]:  # a zero-padded weight: pad the input the same
                x_RI = F.pad(x_RI, (0, weight_EOI.shape[2] - x_RI.shape[1]))
            out_RO = torch._grouped_mm(x_RI, weight_EOI.transpose(1, 2), offs=ends_E.to(torch.int32))[:, :width]
        else:
            out_RO = torch.bmm(weight_EOI.index_select(0, expert_R), x_RI.unsqueeze(2)).squeeze(2)
        if bias_E1O is not None:
            out_RO = out_RO + bias_E1O[:, 0].index_select(0, expert_R)
        return out_RO


class ExpertTable:
    """Where each of the A = T*K assignments of `expert_TK` goes in an expert-ordered buffer of A
    rows (rows of expert 0 first, each expert's in assignment order a = token * K + choice), from the
    dense [A, E] one-hot table."""

    def __init__(self, expert_TK: torch.Tensor, num_experts: int):
        device, top_k = expert_TK.device, expert_TK.shape[1]
        expert_A = expert_TK.reshape(-1)
        assignments = expert_A.shape[0]
        self.onehot_AE = (expert_A.unsqueeze(1) == torch.arange(num_experts, device=device)).to(torch.int64)
        rows_E = self.onehot_AE.sum(0)
        self.ends_E = torch.cumsum(rows_E, 0)
        rank_A = (torch.cumsum(self.onehot_AE, 0) - 1).gather(1, expert_A.unsqueeze(1)).squeeze(1)
        self.row_of_assignment_A = (self.ends_E - rows_E).index_select(0, expert_A) + rank_A
        assignment_R = torch.empty_like(expert_A).scatter_(
            0, self.row_of_assignment_A, torch.arange(assignments, device=device))
        self.token_of_row_R = assignment_R // top_k
        self.expert_of_row_R = expert_A.index_select(0, assignment_R)

    def count(self, counted_A: torch.Tensor | None) -> torch.Tensor:
        """Assignments per expert [E] int64, of those marked in `counted_A` (bool; None: all)."""
        if counted_A is None:
            return self.onehot_AE.sum(0)
        return (self.onehot_AE * counted_A.unsqueeze(1)).sum(0)


def _aligned(weight_EOI: torch.Tensor) -> torch.Tensor:
    """The weight itself when its widths satisfy _grouped_mm's alignment, else a zero-padded copy."""
    step = GROUPED_MM_ALIGN_BYTES // weight_EOI.element_size()
    outputs, inputs = weight_EOI.shape[1], weight_EOI.shape[2]
    padded = (-outputs % step, -inputs % step)
    if padded == (0, 0) and weight_EOI.is_contiguous():
        return weight_EOI
    return F.pad(weight_EOI.detach(), (0, padded[1], 0, padded[0])).contiguous()
