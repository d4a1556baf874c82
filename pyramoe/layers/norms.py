"""Normalisation layers: LayerNorm (GPT-2) or RMSNorm (the Llama family), chosen by the config.

Legend: D normalised width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back before the gain (as the
    Llama-family reference implementations do, so bf16 models normalise the same way)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        # F.rms_norm computes x * rsqrt(mean(x^2) + eps), in one call from Python.
        normed = F.rms_norm(x_D.to(torch.float32), (x_D.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x_D.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, width: int, eps: float) -> nn.Module:
    """"layernorm" (with bias, as GPT-2) or "rmsnorm"."""
    if kind == "rmsnorm":
        return RMSNorm(width, eps)
    return nn.LayerNorm(width, eps=eps)
