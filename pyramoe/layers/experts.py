"""A layer's experts as stacked weights, computed as a grouped GEMM.

Legend: E local experts, D width, F expert hidden width (2F for SwiGLU's fused gate|up), S rows
per expert in a padded buffer, N rows in a compact buffer.

Weights are stored like nn.Linear, [E, out, in] (w_in: [E, F, D], w_out: [E, D, F]), which is also
the fused layout of Hugging Face MoE experts; MKL's batched GEMM ran both expert GEMMs ~10% faster
with the weight as a transposed operand than with [E, in, out].

`expert_offset` records which of the layer's experts this module holds, [expert_offset,
expert_offset + num_experts): a MoELayer builds all its experts (offset 0); expert parallelism
(`pyramoe.parallel`) replaces them with a `shard` per rank, and consolidated checkpoints put each
shard back at its global expert ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyramoe.layers.mlp import activate
from pyramoe.layers.packed import packed_linear


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        bias: bool = True,
        expert_offset: int = 0,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.expert_offset = expert_offset
        self.activation = activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = nn.Parameter(torch.empty(num_experts, width, d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b_in = nn.Parameter(torch.zeros(num_experts, 1, width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, 1, d_model)) if bias else None
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)
        # Inference only: per-expert weights prepacked for oneDNN (`pyramoe.layers.packed`), which
        # then replace w_in and w_out.
        self.packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def global_expert_ids(self) -> range:
        return range(self.expert_offset, self.expert_offset + self.num_experts)

    def shard(self, start: int, count: int) -> GroupedExperts:
        """A copy holding local experts [start, start + count) of this module, with the global offset
        that follows (expert parallelism gives each rank one such shard)."""
        if not (0 <= start and count >= 1 and start + count <= self.num_experts):
            raise ValueError(f"experts: shard [{start}, {start + count}) is outside 0..{self.num_experts}")
        d_ff, d_model = self.w_out.shape[2], self.w_out.shape[1]
        bias = self.b_in is not None
        shard = GroupedExperts(count, d_model, d_ff, self.activation, bias, self.expert_offset + start)
        shard.to(device=self.w_in.device, dtype=self.w_in.dtype)
        with torch.no_grad():
            for name, param in shard.named_parameters():
                param.copy_(getattr(self, name)[start : start + count])
        return shard

    def forward(
        self, x_rows: torch.Tensor, tokens_per_expert: torch.Tensor, rows_per_expert: int | None,
        host_counts: list[int] | None = None,
    ) -> torch.Tensor:
        """x_rows is either padded ([E*S, D], expert e owns rows e*S..e*S+S) or compact
        ([N, D], expert e owns the next tokens_per_expert[e] rows). `host_counts`: tokens_per_expert
        as a list, when the caller already read it (saves the CPU loop a wait on the device)."""
        if self.packed is not None:
            return self._forward_packed(x_rows, tokens_per_expert, rows_per_expert, host_counts)
        if rows_per_expert is None and use_device_grouped_mm(x_rows):
            return self._forward_grouped_mm(x_rows, tokens_per_expert)
        if rows_per_expert is not None:
            x = x_rows.view(self.num_experts, rows_per_expert, -1)
            counts = None
        else:
            x = x_rows
            counts = host_counts if host_counts is not None else tokens_per_expert.tolist()
        h = grouped_linear(x, self.w_in, self.b_in, counts)
        y = grouped_linear(activate(h, self.activation), self.w_out, self.b_out, counts)
        return y.flatten(0, 1) if counts is None else y


    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Local expert e on its rows (inference: a decode step calls it per chosen expert)."""
        b_in = None if self.b_in is None else self.b_in[e, 0]
        b_out = None if self.b_out is None else self.b_out[e, 0]
        if self.packed is not None:
            h = packed_linear(x_ND, self.packed[0][e], b_in)
            return packed_linear(activate(h, self.activation), self.packed[1][e], b_out)
        h = F.linear(x_ND, self.w_in[e], b_in)
        return F.linear(activate(h, self.activation), self.w_out[e], b_out)

    def _forward_packed(
        self, x_rows: torch.Tensor, tokens_per_expert: torch.Tensor, rows_per_expert: int | None,
        host_counts: list[int] | None = None,
    ) -> torch.Tensor:
        sizes = rows_per_expert if rows_per_expert is not None else host_counts or tokens_per_expert.tolist()
        outs = [self.expert_forward(e, x_e) if x_e.shape[0] else x_e for e, x_e in enumerate(x_rows.split(sizes))]
        return torch.cat(outs)

    def _forward_grouped_mm(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Compact rows on a GPU: one grouped GEMM per projection from device-side offsets, so no
        per-expert loop and no host sync (the CPU path's counts.tolist())."""
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x_ND.dtype
        offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        expert_N = None
        if self.b_in is not None:
            experts = torch.arange(self.num_experts, device=x_ND.device)
            expert_N = torch.repeat_interleave(experts, tokens_per_expert, output_size=x_ND.shape[0])
        with torch.autocast("cuda", enabled=False):
            h = _grouped_mm_linear(x_ND.to(dtype), self.w_in, self.b_in, offsets, expert_N)
            return _grouped_mm_linear(activate(h, self.activation), self.w_out, self.b_out, offsets, expert_N)


def use_device_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm on CUDA in bf16 (its supported dtype there); other cases keep the loop."""
    if not x.is_cuda or not hasattr(torch, "_grouped_mm"):
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype == torch.bfloat16


def _grouped_mm_linear(
    x_NI: torch.Tensor, weight_EOI: torch.Tensor, bias_E1O: torch.Tensor | None, offsets_E: torch.Tensor,
    expert_N: torch.Tensor | None,
) -> torch.Tensor:
    out_NO = torch._grouped_mm(x_NI, weight_EOI.to(x_NI.dtype).transpose(1, 2), offs=offsets_E)
    if bias_E1O is None:
        return out_NO
    return out_NO + bias_E1O[:, 0].to(x_NI.dtype).index_select(0, expert_N)


def grouped_linear(
    x: torch.Tensor, weight_EOI: torch.Tensor, bias_E1O: torch.Tensor | None, counts: list[int] | None
) -> torch.Tensor:
    """Per-expert x_e @ W_e^T + b_e over a padded [E, S, I] batch (counts None) or compact [N, I] rows
    with counts[e] rows per expert."""
    return _GroupedLinear.apply(x, weight_EOI, bias_E1O, counts)


class _GroupedLinear(torch.autograd.Function):
    """Hand-written backward so weight gradients are produced directly in the [E, O, I] layout.

    Autograd of bmm(x, W.transpose(1, 2)) computes dW as [E, I, O] and then copies it transposed
    (256 MB for 64 experts of 512x2048: it nearly doubled the backward), and per-expert slices
    W[e] in a loop each materialise a full-size zero gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts):  # noqa: ANN001, ANN205
        # Under autocast, compute in the autocast dtype as torch.bmm would, and give gradients back
        # in each input's own dtype (fp32 master weights).
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.input_dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        with torch.autocast(device, enabled=False):
            return _grouped_linear_forward(x, weight, bias, counts)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.input_dtypes
        with torch.autocast(x.device.type, enabled=False):
            grad_out = grad_out.to(x.dtype).contiguous()
            grads = _grouped_linear_backward(grad_out, x, weight, b_dtype is not None, ctx.counts)
        grad_x, grad_w, grad_b = (
            None if g is None else g.to(dtype) for g, dtype in zip(grads, (x_dtype, w_dtype, b_dtype))
        )
        return grad_x, grad_w, grad_b, None


def _grouped_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: list[int] | None
) -> torch.Tensor:
    if counts is None:
        out = torch.bmm(x, weight.transpose(1, 2))
        # An in-place add: baddbmm would first copy the broadcast bias into the whole output.
        return out if bias is None else out.add_(bias)
    out = x.new_empty(x.shape[0], weight.shape[1])
    for e, (x_e, out_e) in enumerate(zip(x.split(counts), out.split(counts))):
        if x_e.shape[0]:
            torch.mm(x_e, weight[e].t(), out=out_e)
            if bias is not None:
                out_e.add_(bias[e])
    return out


def _grouped_linear_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, counts: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if counts is None:
        grad_b = grad_out.sum(dim=1, keepdim=True) if has_bias else None
        return torch.bmm(grad_out, weight), torch.bmm(grad_out.transpose(1, 2), x), grad_b
    grad_x = torch.empty_like(x)
    grad_w = torch.zeros_like(weight)
    grad_b = weight.new_zeros(weight.shape[0], 1, weight.shape[1]) if has_bias else None
    for e, (x_e, g_e, gx_e) in enumerate(zip(x.split(counts), grad_out.split(counts), grad_x.split(counts))):
        if not x_e.shape[0]:
            continue
        torch.mm(g_e, weight[e], out=gx_e)
        torch.mm(g_e.t(), x_e, out=grad_w[e])
        if grad_b is not None:
            torch.sum(g_e, dim=0, keepdim=True, out=grad_b[e])
    return grad_x, grad_w, grad_b
