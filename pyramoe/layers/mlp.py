"""Dense feed-forward block: GELU MLP (GPT) or SwiGLU (LLaMA/Mixtral-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU on h, or SwiGLU on h = [gate | up] split along the last dimension."""
    if activation == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.activation = activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.fc_in = nn.Linear(d_model, width, bias=bias)
        self.fc_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(activate(self.fc_in(x), self.activation))
