"""Weights prepacked for oneDNN: CPU inference without a repack of every weight on every call.

PyTorch's CPU linear runs oneDNN's matmul on the plain [out, in] weight at every call (ONEDNN_VERBOSE
shows `brg_matmul` with weights `ba`). Reordered once into oneDNN's blocked layout (`AB16b64a2b` for
bf16), the inner-product kernel ran the bench model's batch-1 GEMVs 1.9-2.4x faster in bf16 and
1.0-1.9x in fp32, and 1.2-2.4x at 16-256 rows (2-core AVX512-BF16 VM shared with other jobs, one
thread); bf16 results are
identical to F.linear's, fp32 ones differ in the last bits (another summation order).

`pyramoe.inference.packing.pack_model` swaps each plain nn.Linear of a model for a `PackedLinear` and
gives each `GroupedExperts` one packed weight per expert, freeing the plain copies. A packed weight
is either oneDNN's (a tensor), the native kernels' blocked bf16 layout (`pyramoe.kernels.
BlockedWeight`, what the engine's native forward reads) or their int8 and int4 ones (`pyramoe.
kernels.Int8Weight`, `Int4Weight`, computed here by their PyTorch references); `packed_linear` takes
them all.

Legend: N rows, I input width, O output width, E experts, F expert hidden width.
"""

from __future__ import annotations

import torch
from torch import nn

from pyramoe.kernels import (
    BlockedWeight,
    Int4Weight,
    Int8Weight,
    block_weights,
    blocked_linear,
    int4_linear,
    int8_linear,
)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def can_pack(weight: torch.Tensor) -> bool:
    """A 2-D CPU weight in fp32, or in bf16 where oneDNN has bf16 kernels for this CPU (AVX512 and up)."""
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES or weight.dim() != 2:
        return False
    if not packing_available():
        return False
    return weight.dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(weight_OI: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of an [out, in] weight (tuned for few rows: a decode step)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight_OI.detach().contiguous(), 1)


def packed_linear(
    x_NI: torch.Tensor, packed: torch.Tensor | BlockedWeight | Int8Weight | Int4Weight, bias_O: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(packed, BlockedWeight):
        return blocked_linear(x_NI, packed, bias_O)
    if isinstance(packed, Int8Weight):  # PyTorch's reference of the native int8 products
        return int8_linear(x_NI, packed, bias_O)
    if isinstance(packed, Int4Weight):
        return int4_linear(x_NI, packed, bias_O)
    return torch.ops.mkldnn._linear_pointwise(x_NI, packed, bias_O, "none", [], "")


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight is prepacked for oneDNN, or `blocked` for the native
    kernels (bf16), or quantized (`quantized`: `pyramoe.kernels.Int8Weight` or `Int4Weight`)."""

    def __init__(self, linear: nn.Linear, blocked: bool = False, out: torch.Tensor | None = None,
                 quantized: Int8Weight | Int4Weight | None = None):
        """`out`: where to write the blocked weight (a preallocated tensor of its shape)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if quantized is not None:
            self.packed_weight = quantized
        elif blocked:
            data = block_weights(linear.weight, out)
            self.packed_weight = BlockedWeight(data, self.out_features, self.in_features)
        else:
            self.register_buffer("packed_weight", pack_weight(linear.weight), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)

    def extra_repr(self) -> str:
        layout = ("blocked" if isinstance(self.packed_weight, BlockedWeight) else
                  "int8" if isinstance(self.packed_weight, Int8Weight) else
                  "int4" if isinstance(self.packed_weight, Int4Weight) else "packed")
        return f"in_features={self.in_features}, out_features={self.out_features}, {layout}"
