"""Rotary position embeddings (RoPE) in the rotate-half convention of the Llama family.

Legend: B batch, T positions, H heads, Dh head width (or its rotated part, for partial RoPE).
The inverse frequencies and angles are computed in fp32 exactly as Hugging Face's default RoPE
does (theta^(-2i/Dh), angles = position * inv_freq, [angles | angles]), so imported checkpoints
give the same logits to the last bit of fp32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class RotaryEmbedding:
    """Not an nn.Module: the frequencies are derived from (head_dim, theta), never trained nor saved,
    and must stay fp32 when the model is cast to bf16."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None):
        self.head_dim = head_dim
        self.theta = theta
        # On the CPU explicitly: a model built under `with torch.device("meta")` still needs real frequencies.
        steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
        if scaling is None:
            self.inv_freq = 1.0 / (theta ** (steps / head_dim))
            self.attention_factor = 1.0
        else:
            self.inv_freq, self.attention_factor = yarn_frequencies(head_dim, theta, scaling)

    def cos_sin(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each [B, 1, T, Dh] (broadcast over heads), in `dtype`."""
        inv_freq = self.inv_freq.to(positions_BT.device)
        angles_BTd = positions_BT[..., None].float() * inv_freq
        angles_BTD = torch.cat((angles_BTd, angles_BTd), dim=-1)
        cos, sin = angles_BTD.cos(), angles_BTD.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers computes it: low frequencies interpolated by `factor`,
    high ones kept, a linear ramp between the dimensions whose wavelengths make beta_slow and
    beta_fast turns over the original context; cos/sin scaled by the attention factor."""
    factor = scaling["factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    # On the CPU explicitly, as in __init__ (meta-device builds).
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


_SIGNS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _half_signs(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[-1, ..., -1, 1, ..., 1] of `width`, cached."""
    key = (width, dtype, device)
    if key not in _SIGNS:
        signs = torch.ones(width, dtype=dtype, device=device)
        signs[: width // 2] = -1.0
        _SIGNS[key] = signs
    return _SIGNS[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x; when cos/sin are narrower than a head (partial RoPE), only its first dimensions."""
    rotated = cos.shape[-1]
    if rotated == x_BHTD.shape[-1]:
        # rotate_half(x) * sin == roll(x, half) * [-sin | sin], bit for bit (a sign flip is exact),
        # in fewer ops than the slices, negation and concatenation.
        return x_BHTD * cos + x_BHTD.roll(rotated // 2, -1) * (sin * _half_signs(rotated, sin.dtype, sin.device))
    x_rot, x_pass = x_BHTD[..., :rotated], x_BHTD[..., rotated:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)
