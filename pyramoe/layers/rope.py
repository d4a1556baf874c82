"""Rotary position embeddings (RoPE) in the rotate-half convention of the Llama family.

Legend: B batch, T positions, H heads, Dh head width (or its rotated part, for partial RoPE).
The inverse frequencies and angles are computed in fp32 exactly as Hugging Face's default RoPE
does (theta^(-2i/Dh), angles = position * inv_freq, [angles | angles]), so imported checkpoints
give the same logits to the last bit of fp32 rounding.
"""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """Not an nn.Module: the frequencies are derived from (head_dim, theta), never trained nor saved,
    and must stay fp32 when the model is cast to bf16."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        # On the CPU explicitly: a model built under `with torch.device("meta")` still needs real frequencies.
        steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
        self.inv_freq = 1.0 / (theta ** (steps / head_dim))

    def cos_sin(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each [B, 1, T, Dh] (broadcast over heads), in `dtype`."""
        inv_freq = self.inv_freq.to(positions_BT.device)
        angles_BTd = positions_BT[..., None].float() * inv_freq
        angles_BTD = torch.cat((angles_BTd, angles_BTd), dim=-1)
        return angles_BTD.cos().to(dtype).unsqueeze(1), angles_BTD.sin().to(dtype).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x; when cos/sin are narrower than a head (partial RoPE), only its first dimensions."""
    rotated = cos.shape[-1]
    if rotated == x_BHTD.shape[-1]:
        return x_BHTD * cos + rotate_half(x_BHTD) * sin
    x_rot, x_pass = x_BHTD[..., :rotated], x_BHTD[..., rotated:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)
