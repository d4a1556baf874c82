"""Normalisation layers: LayerNorm (GPT-2) or RMSNorm (the Llama family), chosen by the config.

Legend: D normalised width.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back before the gain (as the
    Llama-family reference implementations do, so bf16 models normalise the same way)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        dtype = x_D.dtype
        x32 = x_D.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, width: int, eps: float) -> nn.Module:
    """"layernorm" (with bias, as GPT-2) or "rmsnorm"."""
    if kind == "rmsnorm":
        return RMSNorm(width, eps)
    return nn.LayerNorm(width, eps=eps)
